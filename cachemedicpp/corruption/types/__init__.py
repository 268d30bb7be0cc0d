"""The shipped corruption types, one module per type or tight family. Importing this package registers
them, in the registry's order: the statistical types, then the fault models, then the wrapper."""

from cachemedicpp.corruption.types import statistical, overwrite, bitflip, block_fault, targeted  # noqa: F401,I001
