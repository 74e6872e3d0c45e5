"""absl flags for every `TrainSettings` field, defined from the dataclass.

Importing this module defines one flag per field of
`selfkd_tf.experiment.settings.TrainSettings`, with the field's name, default and
help, so the flags and the settings cannot drift apart. Lists (``methods``,
``byot_exits``) are comma-separated; ``--methods=`` is the baseline.

Example (a command that adds its own flags):

```python
from absl import flags
from selfkd_tf.cli import flags as train_flags

flags.DEFINE_integer("trials", 20, "Tuning trials.")

def main(argv):
    settings = train_flags.settings_from_flags()
```
"""

from __future__ import annotations

import dataclasses
import types
import typing

from absl import flags

from selfkd_tf.experiment.settings import TrainSettings

from selfkd_tf.errors import SettingsError

_DEFINE = {
    str: flags.DEFINE_string,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    tuple: flags.DEFINE_list,
}


def _base_type(hint) -> type:
    """``int | None`` -> ``int``; ``tuple[str, ...]`` -> ``tuple``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [h for h in typing.get_args(hint) if h is not type(None)]
    return typing.get_origin(hint) or hint


def _fields():
    hints = typing.get_type_hints(TrainSettings)
    return [(field, _base_type(hints[field.name]))
            for field in dataclasses.fields(TrainSettings)]


def define_train_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines a flag for every `TrainSettings` field in ``flag_values``."""
    for field, kind in _fields():
        default = field.default
        if kind is tuple and default is not None:
            default = [str(item) for item in default]
        _DEFINE[kind](field.name, default, field.metadata["help"],
                      flag_values=flag_values)


def settings_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> TrainSettings:
    """The `TrainSettings` the parsed flags describe (not yet validated).

    Raises:
        SettingsError: ``--byot_exits`` holds something other than integers.
    """
    values = {}
    for field, kind in _fields():
        value = flag_values[field.name].value
        if kind is tuple and value is not None:
            value = tuple(value)
            if field.name == "byot_exits":
                try:
                    value = tuple(int(item) for item in value)
                except ValueError:
                    raise SettingsError(
                        "byot_exits", f"got {','.join(value)!r}; allowed: "
                        "comma-separated exit indices, e.g. 1,2") from None
        values[field.name] = value
    return TrainSettings(**values)


define_train_flags()
