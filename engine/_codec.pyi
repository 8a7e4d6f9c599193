IMPLEMENTATION: str
LZ4_VERSION: int

def lz4_decompress_into(src: bytes | bytearray | memoryview, out: bytearray | memoryview) -> int: ...
