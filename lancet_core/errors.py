"""Error types raised at lancet's edges. Each message names the file, the row and the problem."""


class LancetError(Exception):
    """Base class for every error lancet raises on purpose."""


class CorpusError(LancetError, ValueError):
    """A corpus file cannot be used as given (missing columns, empty, bad encoding, duplicate ids, ...)."""


class ManifestMismatch(LancetError):
    """An artifact directory was built with other inputs or settings than the ones asked for now."""


class ConfigError(LancetError, ValueError):
    """A setting that cannot be used as given (e.g. a value that must be resolved first); the message says which."""
