"""What mimjax says about what it was given: a config value, data, a
checkpoint, the environment. The command line prints these as one line
(`mimjax: error: ...`, exit 1); any other exception, such as one raised in
a researcher's own loss or mask function, keeps its traceback."""


class Error(Exception):
  """A problem mimjax found and can say in one line."""


class Invalid(Error, ValueError):
  """A value mimjax cannot use: a config key, an input, a checkpoint."""


class Missing(Error, FileNotFoundError):
  """Something named (a file, a directory, a dataset) is not there."""


class NonFinite(Error, FloatingPointError):
  """A step produced a non-finite loss or gradient."""


class Preempted(Exception):
  """The run stopped early on a pre-emption notice, its work saved; the
  command line exits with training/preemption.EXIT_CODE."""
