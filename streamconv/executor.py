"""Where the executor used to live; it is now `streamconv.execution` (workspace, assemblers, executor). These
names stay importable from here for the code and scripts that use them."""
from .execution.executor import Executor, check_stored  # noqa: F401
from .execution.workspace import Cancelled, Progress  # noqa: F401
