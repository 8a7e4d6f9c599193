"""The VMware texts a published session starts with: the ``.vmx`` and each disk's ``.vmdk``.

Both are generated once at publish into the session directory and are ordinary files
from then on (ESXi rewrites the ``.vmx``). The ``.vmx`` describes the VM the restore
point's manifest records (CPUs, memory, firmware, guest OS) with its disks on a
paravirtual SCSI adapter and its network adapter disconnected, so a recovered VM never
meets the original on the network until an operator connects it. Each ``.vmdk`` is a
monolithic-flat descriptor (createType ``vmfs``) whose one extent is the disk's
``-flat.vmdk`` file; its CID is derived from the point and disk, so it is the same at
every publish of that disk.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from engine.repo.repository import RestorePoint


def vmx_text(point: RestorePoint, indexes: list[int] | None = None) -> str:
    """The VM's ``.vmx``; ``indexes``: the point's disks published (default all)."""
    m = point.manifest
    lines = [
        '.encoding = "UTF-8"',
        'config.version = "8"',
        'virtualHW.version = "14"',
        f'displayName = "{point.vm}"',
        f'guestOS = "{m.get("guest_os") or "other-64"}"',
        f'numvcpus = "{m.get("cpus") or 1}"',
        f'memSize = "{m.get("memory_mib") or 1024}"',
        'scsi0.present = "TRUE"',
        'scsi0.virtualDev = "pvscsi"',
    ]
    if (m.get("firmware") or "bios") == "efi":
        lines.append('firmware = "efi"')
    chosen = [point.disks[i] for i in (range(len(point.disks)) if indexes is None else indexes)]
    for i, d in enumerate(chosen):
        lines += [f'scsi0:{i}.present = "TRUE"', f'scsi0:{i}.fileName = "{d.name}.vmdk"', f'scsi0:{i}.deviceType = "scsi-hardDisk"']
    lines += [
        'ethernet0.present = "TRUE"',
        'ethernet0.virtualDev = "vmxnet3"',
        'ethernet0.networkName = "VM Network"',
        'ethernet0.startConnected = "FALSE"',
        'instantnfs.restorePoint = "' + point.id + '"',
    ]
    return "\n".join(lines) + "\n"


def vmdk_descriptor(name: str, size: int, cid: int) -> str:
    sectors = (size + 511) // 512
    cylinders = max(1, min(65535, sectors // (255 * 63)))
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="vmfs"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} VMFS "{name}-flat.vmdk"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
        'ddb.virtualHWVersion = "14"\n'
    )


def write_vm_files(session_dir: Path, point: RestorePoint, indexes: list[int] | None = None) -> None:
    """The ``.vmx`` and the ``.vmdk`` descriptors of a new session (blocking); ``indexes``:
    the point's disks it publishes (default all)."""
    (session_dir / f"{point.vm}.vmx").write_text(vmx_text(point, indexes))
    for info in (point.disks if indexes is None else [point.disks[i] for i in indexes]):
        cid = int.from_bytes(hashlib.blake2b(f"{point.id}/{info.name}".encode(), digest_size=4).digest(), "big")
        (session_dir / f"{info.name}.vmdk").write_text(vmdk_descriptor(info.name, info.size, cid))
