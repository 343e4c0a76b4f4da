"""The prompt loop's words for the sampling settings: a flag and a /command per setting (a Knob),
what /settings and /help print, and how a typed value becomes a setting. The settings themselves
and the sampler are in sampling.py."""

import dataclasses
from dataclasses import dataclass
from typing import Callable

from custom_llm.flags import NUMBERS
from custom_llm.sampling import Settings


def unescape(text: str) -> str:
    r"""Stop strings may hold \n (newline), \t (tab) and \\ (backslash), typed as such."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _stop(text):
    value = unescape(text)
    if not value:
        raise ValueError("a stop string cannot be empty")
    return value


@dataclass
class Knob:
    """One setting as a command-line flag and as a /command in the prompt loop."""
    name: str                        # Settings field and --flag
    command: str                     # /command
    parse: Callable[[str], object]   # raises ValueError(reason)
    help: str
    can_be_off: bool = False         # `/command off` turns it off (None)


def _number(name, command, can_be_off=False) -> Knob:
    """A numeric knob: parsed, checked and described by its row in flags.NUMBERS."""
    number = NUMBERS[name]
    return Knob(name, command, number.parse, number.meaning + (f" ({number.note})" if number.note else ""),
                can_be_off)


KNOBS = [
    _number("temperature", "temp"),
    _number("top_k", "top_k", can_be_off=True),
    _number("top_p", "top_p", can_be_off=True),
    _number("min_p", "min_p", can_be_off=True),
    _number("repeat_penalty", "repeat_penalty"),
    _number("repeat_last_n", "repeat_last_n"),
    _number("max_tokens", "max"),
    _number("seed", "seed", can_be_off=True),
    Knob("stop", "stop", _stop, r"end the text before STR (\n for a newline); repeatable"),
]
KNOB_BY_COMMAND = {k.command: k for k in KNOBS}


def _metavar(knob) -> str:
    return "STR" if knob.name == "stop" else "N" if NUMBERS[knob.name].kind is int else "F"


def add_setting_flags(parser, defaults: Settings) -> None:
    """One flag per knob; the numeric ones are checked by the parser against flags.NUMBERS."""
    for knob in KNOBS:
        if knob.name == "stop":
            parser.add_argument("--stop", action="append", default=[], metavar="STR", help=knob.help)
        else:
            parser.add_number(knob.name, shown_default=getattr(defaults, knob.name))


def settings_from_flags(args, defaults: Settings) -> Settings:
    """Settings from parsed flags (numbers already checked); a bad stop string raises
    ValueError('--stop: reason')."""
    settings = dataclasses.replace(defaults, stop=list(defaults.stop))
    for knob in KNOBS:
        given = getattr(args, knob.name)
        if knob.name == "stop":
            try:
                settings.stop = [knob.parse(s) for s in given]
            except ValueError as reason:
                raise ValueError(f"--stop: {reason}") from None
        elif given is not None:
            setattr(settings, knob.name, given)
    return settings


def apply_command(settings: Settings, command: str, argument: str) -> str:
    """Change one setting from a /command; returns what changed, raises ValueError(reason)."""
    knob = KNOB_BY_COMMAND.get(command)
    if knob is None:
        raise ValueError(f"unknown command /{command}; /help lists the commands")
    argument = argument.strip()
    if knob.name == "stop":
        if not argument:
            settings.stop = []
            return "stop strings cleared"
        settings.stop.append(knob.parse(argument))
        return f"stop strings: {', '.join(map(repr, settings.stop))}"
    if not argument:
        raise ValueError(f"/{command} needs a value: {knob.help}")
    if argument.lower() == "off" and knob.can_be_off:
        setattr(settings, knob.name, None)
        return f"{knob.name} off"
    try:
        setattr(settings, knob.name, knob.parse(argument))
    except ValueError as reason:
        raise ValueError(f"/{command}: {reason}") from None
    return f"{knob.name} = {getattr(settings, knob.name)}"


def describe(settings: Settings) -> str:
    """The settings in /help's words: `top_k off` for a knob turned off, `stop none` without stop strings."""
    def value(knob):
        v = getattr(settings, knob.name)
        if knob.name == "stop":
            return ", ".join(map(repr, v)) or "none"
        return "off" if v is None and knob.can_be_off else str(v)
    return ", ".join(f"{k.command} {value(k)}" for k in KNOBS)


def command_help(chat: bool = False) -> str:
    """The commands; with chat (a chat model's conversation), /reset too."""
    lines = [f"  /{k.command} {_metavar(k)}".ljust(26) + k.help
             + (" (or 'off')" if k.can_be_off else "") for k in KNOBS]
    lines += ["  /stop".ljust(26) + "clear the stop strings"]
    if chat:
        lines += ["  /reset".ljust(26) + "start the conversation over"]
    lines += ["  /settings".ljust(26) + "show the current settings",
              "  /help".ljust(26) + "this list",
              "  /quit".ljust(26) + "leave (so do Ctrl-D and an empty line)",
              "Ctrl-C stops a generation; a prompt starting with / is sent as text when written //."]
    return "\n".join(lines)
