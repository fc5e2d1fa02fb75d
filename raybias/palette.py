"""Named colours: the foreground colours of the built-in colored_digits data (`data.colors`) and
the broader palette of the rendered font corpus the builtin backbone learns from
(`base.check_colors`). Imports nothing, so the config checks colour names against it."""

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

# The task's colours first, then two more: the backbone knows colours the task does not use.
CORPUS_RGB = dict(COLOR_RGB, gray=(140, 140, 140), magenta=(225, 30, 150))
