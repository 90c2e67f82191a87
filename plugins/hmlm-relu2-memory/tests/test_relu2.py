"""hmlm-relu2-memory passes hmlm's memory-type conformance kit."""
from hmlm.testing import MemoryTypeTests


class TestReLU2(MemoryTypeTests):
    plugin = "relu2"   # resolved through the installed entry point
