"""Facts about PatchCamelyon shared by every part of the project."""

PCAM_MEAN: tuple[float, float, float] = (0.7008, 0.5384, 0.6916)
PCAM_STD: tuple[float, float, float] = (0.2350, 0.2774, 0.2129)
PCAM_INPUT_SIZE: tuple[int, int, int] = (3, 96, 96)
PCAM_NUM_CLASSES: int = 2
LABEL_NAMES: tuple[str, str] = ('normal', 'metastatic')
SPLITS: tuple[str, str, str] = ('train', 'valid', 'test')

# Limits the commands check their options against.
MAX_WORKERS = 256  # worker processes one command starts: a typo such as 100000 would exhaust memory
MAX_SEED = 2**32 - 1  # NumPy's and torch's seeds
