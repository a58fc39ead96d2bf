"""The configuration file of `clonectl serve` (TOML).

Its keys are the long option names of the command, without the dashes in
front: `port = 10809`, `allow = ["10.0.0.0/8"]`, `tls-verify-peer = true`.
The file is read into click's default_map for the command, so click itself
gives the precedence: an option on the command line, then the file, then
the built-in default.  The keys come from the command's own parameters,
so a new option is a new key without further code.

A key the command does not know, or a value of the wrong type, is refused
with a message that names the key and the file: a typo must not leave a
server running with a default the admin thought was changed.
"""

import os
import tomllib

import click

from . import errors

# Options that make no sense in a file: the file itself.
NOT_IN_FILE = ("config_file",)


class ConfigInvalid(errors.Error):
    msg = "configuration file {path}: {reason}"


def keys(command):
    """{file key: click parameter} of command's options."""
    out = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in NOT_IN_FILE:
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        if longs:
            out[longs[0][2:]] = param
    return out


def _type_name(param):
    if param.is_flag:
        return "true or false"
    if param.multiple:
        return "a list of strings"
    if isinstance(param.type, (click.types.IntParamType,
                               click.types.IntRange)):
        return "an integer"
    return "a string"


def _check_type(param, value):
    if param.is_flag:
        return isinstance(value, bool)
    if param.multiple:
        return isinstance(value, list) and all(isinstance(v, str)
                                               for v in value)
    if isinstance(param.type, (click.types.IntParamType,
                               click.types.IntRange)):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def load(path, command, ctx=None):
    """The default_map (parameter name -> value) of the TOML file at path
    for command; ConfigInvalid if the file cannot be read or holds a key
    the command does not know or a value of the wrong type or range."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigInvalid(path=path, reason=e.strerror or str(e))
    except tomllib.TOMLDecodeError as e:
        raise ConfigInvalid(path=path, reason="not valid TOML: {}".format(e))
    known = keys(command)
    default_map = {}
    for key, value in doc.items():
        param = known.get(key)
        if param is None:
            raise ConfigInvalid(path=path, reason="unknown key {!r} (known "
                                "keys: {})".format(key, ", ".join(sorted(
                                    known))))
        if not _check_type(param, value):
            raise ConfigInvalid(path=path, reason="{} must be {}, not "
                                "{!r}".format(key, _type_name(param), value))
        try:
            # Ranges and choices, as on the command line.
            if param.multiple:
                for v in value:
                    param.type.convert(v, param, ctx)
            elif not param.is_flag:
                param.type.convert(value, param, ctx)
        except click.BadParameter as e:
            raise ConfigInvalid(path=path, reason="{}: {}".format(
                key, e.message))
        default_map[param.name] = value
    return default_map


def changed_keys(old, new, command):
    """The file keys whose values differ between two default_maps."""
    names = {param.name: key for key, param in keys(command).items()}
    return sorted(names[n] for n in set(old) | set(new)
                  if old.get(n) != new.get(n))


def help_text(command):
    """The keys, for `serve --help`."""
    return ", ".join(sorted(keys(command)))
