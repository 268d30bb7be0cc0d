"""The colours every figure draws with (no plotting import: defenses declare their style with them).

Okabe-Ito palette (distinguishable under the common colour-vision deficiencies); every curve also gets its
own marker and line style so the figures survive greyscale printing.
"""

BLACK, ORANGE, SKY, GREEN, YELLOW, BLUE, VERMILLION, PURPLE, GREY = (
    "#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#8C8C8C")
BROWN = "#8C510A"  # outside Okabe-Ito (its yellow is too light for a line on white)
SPARE_STYLES = [(GREY, "h"), (YELLOW, "*"), (ORANGE, "<"), (GREEN, ">"), (PURPLE, "p")]
