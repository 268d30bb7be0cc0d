"""targeted: any registered type (`corruption.params.targeted_base`) with the layer and head masks forced to
`corruption.axes.layers` / `axes.heads`; its severity, transform and donor are its base's."""

from cachemedicpp.corruption.registry import CorruptionType, register_corruption

register_corruption(CorruptionType("targeted", "wrapper", base="targeted_base", targeted=True))
