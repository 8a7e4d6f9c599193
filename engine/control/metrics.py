"""What the daemon tells a monitoring system: ``/metrics`` (Prometheus) and ``/healthz``.

``/metrics`` is built when scraped, never before: the request path keeps only plain
integers, which the code handling each call bumps anyway (the dispatcher's and the fast
lane's per-procedure ``Program.stats``, the sessions' I/O counters, the decompression
cache's hits, misses and loads, the connection count) plus the transport's log2
latency buckets (``RpcServer.latency``: two clock reads and two list increments per
call, see ``engine.nfs.rpc``). ``DaemonCollector.collect`` reads them on the loop
thread, where they change, so one scrape sees one consistent moment, and turns the
buckets into Prometheus histograms (``HistogramMetricFamily``; bucket ``le`` bounds are
powers of two in microseconds). Counters of an unpublished session go into
``Sessions.ended_io``, so the daemon-wide byte counters never go back. What a scrape
costs grows with the procedures called and the sessions published, not the traffic.

Who may read them (``open_route``): ``/healthz`` anyone (it tells whether the daemon
serves, nothing more); ``/metrics`` a caller on loopback without a token, anyone else
with the control API's bearer token. This differs from the rest of the API, which
wants the token from loopback too (``engine.control.auth``): the metrics change
nothing and say no more than counts and session names, and a node's Prometheus agent
usually scrapes over loopback without a secret.

``/healthz`` answers 200 when the MOUNT and NFS listeners are open and the repository
answers (its ``config.json`` read and its ``packs``/``points`` directories there, off
the loop, within ``HEALTH_TIMEOUT`` seconds: a repository on a hung NFS mount is "not
serving"), else 503; the JSON body says which check failed.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from engine.datastore import Datastore
from engine.jobs import JOB_STATES, Jobs
from engine.nfs.rpc import LAT_BUCKETS, RpcServer, client_ip
from engine.nfs.server import NFSServices

HEALTH_TIMEOUT = 2.0  # seconds the repository check may take before the daemon counts as not serving
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPEN_PATHS = ("/healthz",)  # never need a token
LOOPBACK_PATHS = ("/metrics",)  # need a token only from an address other than loopback

# bucket upper bounds: 2**i microseconds, as Prometheus spells them (seconds)
_LE = [floatToGoString(2**i / 1e6) for i in range(LAT_BUCKETS)] + ["+Inf"]


def open_route(path: str, remote: str | None) -> bool:
    """Whether a request for ``path`` from ``remote`` (the peer's address) is served
    without a bearer token."""
    if path in OPEN_PATHS:
        return True
    if path in LOOPBACK_PATHS and remote:
        ip = client_ip(remote)
        return ip is not None and ip.is_loopback
    return False


def _histogram(name: str, doc: str, servers: list[tuple[str, RpcServer]]) -> HistogramMetricFamily:
    h = HistogramMetricFamily(name, doc, labels=["program", "procedure"])
    for _, rpc in servers:
        for (prog, vers, procnum), lat in rpc.latency.items():
            program = rpc.programs[prog]
            count = sum(lat[: LAT_BUCKETS + 1])
            if not count:
                continue
            cum, buckets = 0, []
            for le, n in zip(_LE, lat):
                cum += n
                buckets.append((le, cum))
            proc = program.versions[vers][procnum]
            h.add_metric([program.name, proc.name], buckets, lat[LAT_BUCKETS + 1] / 1e9)
    return h


class DaemonCollector(Collector):
    """The daemon's metrics, read from its counters at each scrape (on the loop thread)."""

    def __init__(self, ds: Datastore, services: NFSServices, jobs: Jobs) -> None:
        self.ds = ds
        self.services = services
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        sv = self.services
        servers = [("nfs", sv.nfs_rpc), ("mount", sv.mount_rpc)]
        reqs = CounterMetricFamily("instantnfs_rpc_requests", "RPC calls handled, per program and procedure (both lanes)",
                                   labels=["program", "procedure"])
        for _, rpc in servers:
            for program in rpc.programs.values():
                for proc, n in sorted(program.stats.items()):
                    reqs.add_metric([program.name, proc], n)
        yield reqs
        yield _histogram("instantnfs_rpc_request_duration_seconds",
                         "Time from a call's dispatch to its reply, per program and procedure", servers)
        yield CounterMetricFamily("instantnfs_nfs_io_requests", "NFS READ and WRITE calls", value=sv.nfs_rpc.io_calls)
        yield CounterMetricFamily("instantnfs_rpc_duplicate_replies", "Retransmitted NFS calls answered from the duplicate request cache",
                                  value=sv.nfs_rpc.drc.hits)

        ended = self.ds.registry.ended_io
        sessions = sorted(self.ds.sessions.values(), key=lambda s: s.name)
        totals = [ended[0], ended[1], ended[2], ended[3]]
        s_read = CounterMetricFamily("instantnfs_session_read_bytes", "Bytes read from the session's files", labels=["session"])
        s_write = CounterMetricFamily("instantnfs_session_written_bytes", "Bytes written to the session's files", labels=["session"])
        wc_alloc = GaugeMetricFamily("instantnfs_session_write_cache_allocated_bytes",
                                     "Space the write cache of a session's disk takes on its volume", labels=["session", "disk"])
        wc_dirty = GaugeMetricFamily("instantnfs_session_write_cache_dirty_bytes",
                                     "Bytes of a session's disk that differ from the backup (written)", labels=["session", "disk"])
        modes: dict[str, int] = {}
        for s in sessions:
            totals[0] += s.read_ops
            totals[1] += s.read_bytes
            totals[2] += s.write_ops
            totals[3] += s.write_bytes
            s_read.add_metric([s.name], s.read_bytes)
            s_write.add_metric([s.name], s.write_bytes)
            modes[s.mode] = modes.get(s.mode, 0) + 1
            for d, c in zip(s.disks, s.caches):
                st = c.stats()
                wc_alloc.add_metric([s.name, d.name], st.allocated_bytes)
                wc_dirty.add_metric([s.name, d.name], st.dirty_bytes)
        yield CounterMetricFamily("instantnfs_read_operations", "Reads of session files (all sessions since the start)", value=totals[0])
        yield CounterMetricFamily("instantnfs_read_bytes", "Bytes read from session files (all sessions since the start)", value=totals[1])
        yield CounterMetricFamily("instantnfs_write_operations", "Writes to session files (all sessions since the start)", value=totals[2])
        yield CounterMetricFamily("instantnfs_written_bytes", "Bytes written to session files (all sessions since the start)", value=totals[3])
        yield s_read
        yield s_write
        yield wc_alloc
        yield wc_dirty
        g = GaugeMetricFamily("instantnfs_sessions", "Published sessions, per mode", labels=["mode"])
        for mode in sorted(set(modes) | {"instant", "sandbox"}):
            g.add_metric([mode], modes.get(mode, 0))
        yield g

        cache = self.ds.stack.cache
        yield CounterMetricFamily("instantnfs_chunk_cache_hits", "Decompression cache lookups that found the chunk (or its load under way)",
                                  value=cache.hits)
        yield CounterMetricFamily("instantnfs_chunk_cache_misses", "Decompression cache lookups that had to load the chunk", value=cache.misses)
        yield CounterMetricFamily("instantnfs_chunk_cache_loads", "Chunks read and decompressed (misses and prefetches)", value=cache.loads)
        yield CounterMetricFamily("instantnfs_chunk_cache_loaded_bytes", "Bytes the chunk loads produced (decompressed)",
                                  value=cache.loaded_bytes)
        yield GaugeMetricFamily("instantnfs_chunk_cache_bytes", "Bytes held by the decompression cache", value=cache.size)
        yield GaugeMetricFamily("instantnfs_chunk_cache_capacity_bytes", "The decompression cache's capacity", value=cache.capacity)

        jobs = GaugeMetricFamily("instantnfs_jobs", "Export and commit jobs of this daemon, per kind and state", labels=["kind", "state"])
        counts: dict[tuple[str, str], int] = {(k, st): 0 for k in ("export", "commit") for st in JOB_STATES}
        for j in self.jobs.all():
            counts[(j.kind, j.state)] = counts.get((j.kind, j.state), 0) + 1
        for (kind, state), n in sorted(counts.items()):
            jobs.add_metric([kind, state], n)
        yield jobs

        yield GaugeMetricFamily("instantnfs_connections", "Open TCP connections (NFS, MOUNT and portmapper)", value=sv.limits.count)
        yield CounterMetricFamily("instantnfs_connections_refused", "TCP connections closed at accept: over the connection limits",
                                  value=sv.limits.refused)


def registry(collector: DaemonCollector) -> CollectorRegistry:
    """A registry of the daemon's metrics and its process's (CPU, memory, open files)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    ProcessCollector(registry=reg)
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)


def _check_repo(path: Path) -> None:
    """Raises OSError when the repository cannot be read (blocking: run off the loop)."""
    with open(path / "config.json", "rb") as f:
        f.read(1)
    for sub in ("packs", "points"):
        if not os.path.isdir(path / sub):
            raise FileNotFoundError(f"{path / sub} is missing")


async def health(services: NFSServices, repo_path: Path, timeout: float = HEALTH_TIMEOUT) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 when the daemon serves, else 503 saying why."""
    nfs = services.serving()
    repo_ok, why = True, ""
    try:
        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, _check_repo, repo_path), timeout)
    except TimeoutError:
        repo_ok, why = False, f"the repository {repo_path} did not answer within {timeout:g} s"
    except OSError as e:
        repo_ok, why = False, f"the repository {repo_path} is not readable: {e.strerror or e}"
    body: dict[str, Any] = {"status": "ok" if nfs and repo_ok else "unavailable", "nfs": nfs, "repository": repo_ok}
    if not nfs:
        body["reason"] = "the NFS and MOUNT listeners are not open"
    elif why:
        body["reason"] = why
    return (200 if nfs and repo_ok else 503), body
