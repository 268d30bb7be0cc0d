"""The shipped corruption types, one module per type or tight family. Importing this package registers
them, in the registry's order: the statistical types, then the fault models, then kv_quant (in neither
shipped mixture), then the wrapper."""

from cachemedicpp.corruption.types import (statistical, overwrite, bitflip, block_fault,  # noqa: F401,I001
                                          kv_quant, targeted)
