"""The hostile-input suite's fixture; the workspace and the checks live in ``hostile_workspace`` under a name of
their own, so that ``from hostile_workspace import ...`` never finds another folder's ``conftest`` (as ``from
conftest import ...`` did when ``pytest tests/hostile tests/report`` loaded both conftests at start-up)."""

from hostile_workspace import ws

__all__ = ["ws"]
