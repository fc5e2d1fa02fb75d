"""Named foreground colours for the built-in colored_digits data and the rendered font corpus."""

COLOR_RGB = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
    "orange": (250, 140, 30),
    "cyan": (40, 220, 230),
    "pink": (250, 120, 190),
    "white": (245, 245, 245),
    "brown": (150, 90, 40),
}
