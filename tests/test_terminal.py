"""The terminal at 60, 80 and 120 columns: the training line, wrapped messages, and each stage run
in a pseudo-terminal 80 columns wide, where no line may be wider than the terminal."""

import fcntl
import io
import os
import pty
import re
import struct
import sys
import termios

import pytest
from conftest import REPO, Terminal, make_text, run_script

from custom_llm import progress as progress_module
from custom_llm.commands import apply_command, command_help, describe
from custom_llm.progress import MIN_BAR, Progress, clock, progress_line
from custom_llm.sampling import Settings
from custom_llm.terminal import display_width, say, wrap, wrap_for

WIDTHS = [60, 80, 120]
# (step, total, loss, tokens/s, seconds left): an ordinary run, and one with every number at its widest.
RUNS = [(197, 1100, 1.1540, 45580.0, 162.0), (12345, 100000, 10.1234, 1234567.0, 36000.0),
        (0, 5, float("nan"), 0.0, 0.0)]
TINY_MODEL = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--dropout", "0"]


# ------------------------------------------------------------------ the training line

def bar_of(line):
    found = re.search(r"\|([^|]*)\|", line)
    return found.group(1) if found else None


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("run", RUNS)
def test_training_line_fits_and_shows_everything(width, run):
    step, total, loss, tokens_per_s, seconds_left = run
    line = progress_line(step, total, loss, tokens_per_s, seconds_left, width)
    assert display_width(line) < width                 # never reaches the last column: never wraps
    assert f"{step}/{total}" in line
    bar = bar_of(line)
    assert bar is not None and len(bar) >= MIN_BAR
    filled = bar.count("█")
    assert filled == int(len(bar) * step / total)      # as full as the run is done
    assert f"{loss:.3f}" in line                       # the loss, to 3 or 4 decimals
    assert ("tok/s" in line) or ("/s" in line)
    # One estimate of the time left, the plan's: its clock once, and no other time anywhere.
    assert line.count(clock(seconds_left)) == 1
    assert len(re.findall(r"\d+:\d\d", line)) == 1 and "<" not in line


@pytest.mark.parametrize("width", WIDTHS)
def test_at_80_columns_and_more_the_line_says_it_in_words(width):
    line = progress_line(197, 1100, 1.154, 45580.0, 162.0, width)
    assert "loss 1.1540" in line and "tok/s" in line and "2:42 left" in line
    if width >= 80:
        assert "45,580 tok/s" in line and "18%" in line
    if width == 120:   # the bar takes the room there is
        assert len(bar_of(line)) > len(bar_of(progress_line(197, 1100, 1.154, 45580.0, 162.0, 80)))


def test_without_a_total_the_line_has_no_bar_and_still_fits():
    line = progress_line(7, None, 2.5, 999.0, 100.0, 60)
    assert line.startswith("step 7") and "|" not in line and "1:40 left" in line and len(line) < 60


@pytest.mark.parametrize("width", [30, 40, 45])
def test_narrow_terminals_never_wrap(width):
    for run in RUNS:
        assert len(progress_line(*run, width)) < width


class FakeTerminal(io.StringIO):
    """A terminal's stream, for Progress: says it is a tty."""
    encoding = "utf-8"

    def isatty(self):
        return True


@pytest.fixture
def fake_time(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "time", lambda: now[0])
    return now


def screen_lines(output):
    """What stays on each line of a terminal that received output: the text after the last
    carriage return of each line, with the erase-line code taken out."""
    return [line.split("\r")[-1].replace("\x1b[K", "") for line in output.split("\n")]


def test_progress_rewrites_its_line_in_place(fake_time):
    screen = FakeTerminal()
    shown = Progress(total=100, initial=0, interactive=True, stream=screen, width=80)
    for step in range(1, 101):
        fake_time[0] += 0.5
        shown.update(step, 100, 3.0 - step / 100, 40000.0, 100 - step)
    output = screen.getvalue()
    assert "\n" not in output                          # one line, redrawn: the screen never scrolls
    draws = output.split("\r\x1b[K")[1:]
    assert len(draws) == 100
    assert all(len(d) < 80 for d in draws)
    assert draws[-1].startswith("100/100 100% |" + "█" * len(bar_of(draws[-1])) + "|")
    shown.close()
    assert screen.getvalue().endswith("\r\x1b[K")      # taken away at the end


def test_redraws_are_limited_to_a_few_a_second_but_the_last_step_is_drawn(fake_time):
    screen = FakeTerminal()
    shown = Progress(total=1000, initial=0, interactive=True, stream=screen, width=80)
    for step in range(1, 1001):
        fake_time[0] += 0.001
        shown.update(step, 1000, 1.0, 1.0, 1.0)
    draws = screen.getvalue().split("\r\x1b[K")[1:]
    assert 5 <= len(draws) <= 20
    assert draws[-1].startswith("1000/1000")


def test_messages_go_above_the_line_which_is_drawn_again(fake_time):
    screen = FakeTerminal()
    shown = Progress(total=10, initial=0, interactive=True, stream=screen, width=80)
    shown.update(3, 10, 2.0, 100.0, 7.0)
    shown.write("step 3: validation loss 1.9000")
    lines = screen_lines(screen.getvalue())
    assert lines[0] == "step 3: validation loss 1.9000"
    assert lines[1].startswith("3/10") and len(lines) == 2


def test_progress_follows_a_resized_terminal(fake_time, monkeypatch):
    columns = [120]
    monkeypatch.setattr(progress_module, "width_of", lambda stream: columns[0])
    screen = FakeTerminal()
    shown = Progress(total=100, initial=0, interactive=True, stream=screen)
    for step, width in [(10, 120), (20, 60), (30, 80)]:
        columns[0] = width
        fake_time[0] += 1
        shown.update(step, 100, 2.0, 1000.0, 60.0)
        last = screen.getvalue().split("\r\x1b[K")[-1]
        assert len(last) == width - 1, (width, last)


def test_a_revised_total_is_drawn_at_once(fake_time):
    screen = FakeTerminal()
    shown = Progress(total=None, initial=0, interactive=True, stream=screen, width=80)
    shown.update(1, None, 2.0, 1000.0, 60.0)
    shown.update(2, 400, 2.0, 1000.0, 60.0)             # same instant: drawn anyway, with its bar
    assert screen.getvalue().split("\r\x1b[K")[-1].startswith("2/400 ")


def test_a_long_message_in_a_log_stays_one_line(fake_time):
    log = io.StringIO()
    shown = Progress(total=10, initial=0, interactive=False, stream=log)
    message = "About 1234 steps fit in 10 min " + "and more words " * 20
    shown.write(message)
    assert log.getvalue() == message + "\n"


# ------------------------------------------------------------------------- messages

LONG = ("Training on cpu with 0.24M parameters: 5 epoch(s) of 220 steps, 1100 steps in all; effective "
        "batch 64 windows of 128 tokens (8,192 tokens per step); muon at peak learning rate 0.003 with 55 "
        "warmup steps; float32; validation every 250 steps on 10 batches")


@pytest.mark.parametrize("width", WIDTHS)
def test_messages_wrap_at_word_boundaries(width):
    wrapped = wrap(LONG, width).split("\n")
    assert len(wrapped) > 1 and all(len(line) < width for line in wrapped)
    assert " ".join(line.strip() for line in wrapped) == LONG        # no word cut, none lost
    assert all(line.startswith("  ") for line in wrapped[1:])       # continuation lines stand out


def test_two_column_rows_continue_under_their_second_column():
    for line in wrap(command_help(), 60).split("\n"):
        assert len(line) < 60
    rows = wrap("  /repeat_penalty F       " + "above 1 makes recently seen tokens less likely " * 3, 60).split("\n")
    assert all(row.startswith(" " * 26) and row[26] != " " for row in rows[1:])


def test_a_word_longer_than_the_line_is_broken_not_left_to_wrap():
    path = "/very/long/path/" + "folder/" * 20 + "model.gguf"
    assert all(len(line) < 60 for line in wrap(f"Wrote {path} (F16)", 60).split("\n"))


def test_in_a_file_or_pipe_a_message_stays_as_it_is():
    log = io.StringIO()
    say(LONG, log)
    say("two\nlines", log)
    assert log.getvalue() == LONG + "\ntwo\nlines\n"
    assert wrap_for(log, LONG) == LONG


def test_settings_use_the_words_of_help():
    s = Settings()
    shown = describe(s)
    assert "top_k off" in shown and "top_p off" in shown and "seed off" in shown and "None" not in shown
    assert "(or 'off')" in command_help()
    apply_command(s, "top_k", "40")
    apply_command(s, "stop", r"\n\n")
    assert "top_k 40" in describe(s) and "stop '\\n\\n'" in describe(s)


# ------------------------------------------------------------- each stage at 80 columns

ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*(\x07|\x1b\\)|[=>()][0-9A-Za-z]?)")


def too_wide(output, columns=80):
    """The lines of what a terminal showed that are wider than it: the output split on carriage
    returns and newlines (each redraw is a line of its own), escape codes taken out."""
    pieces = re.split(r"[\r\n]", ANSI.sub("", output))
    return [p for p in pieces if display_width(p) > columns]


class Terminal80(Terminal):
    """A script in a pseudo-terminal of the given size, as in a window that size."""

    def __init__(self, script, *args, cwd, columns=80, rows=24):
        pid, fd = pty.fork()
        if pid == 0:  # child: size its terminal before the script can ask for it
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
            os.environ.pop("COLUMNS", None)
            os.chdir(cwd)
            os.execv(sys.executable, [sys.executable, str(REPO / script), *map(str, args)])
        self.pid, self.fd, self.output, self.matched = pid, fd, "", 0


def test_the_pseudo_terminal_is_80_columns_wide(tmp_path):
    code = tmp_path / "width.py"
    code.write_text("import os, sys\nprint('columns', os.get_terminal_size(sys.stdout.fileno()).columns)\n")
    term = Terminal80(code, cwd=tmp_path)
    assert term.wait() == 0
    assert "columns 80" in term.output


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A folder where a tiny model was configured, trained a few steps and exported (through pipes)."""
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "story.txt").write_text(make_text(400), encoding="utf-8")
    for script, args in [("llm_model.py", [*TINY_MODEL, "-y"]),
                         ("train_llm.py", ["--dataset_path", "story.txt", "--max_steps", 20, "--batch_size", 8, "-y"]),
                         ("convert_to_gguf.py", [])]:
        result = run_script(script, *args, cwd=folder)
        assert result.returncode == 0, f"{script}: {result.stdout}\n{result.stderr}"
    return folder


def test_llm_model_questions_at_80_columns(tmp_path):
    term = Terminal80("llm_model.py", "--n_layer", 1, "--n_embd", 32, "--n_head", 2, cwd=tmp_path)
    term.read_until("[char]:")
    term.send("300\n")
    term.read_until("Context length")
    term.send("\x04")  # Ctrl-D: defaults for the rest
    assert term.wait() == 0, term.output
    assert "parameters" in term.output
    assert too_wide(term.output) == [], term.output


def test_llm_model_char_at_80_columns(tmp_path):
    term = Terminal80("llm_model.py", *TINY_MODEL, "-y", cwd=tmp_path)
    assert term.wait() == 0, term.output
    assert "per vocabulary entry" in term.output
    assert too_wide(term.output) == [], term.output


def training_in_a_terminal(folder, columns=80):
    term = Terminal80("train_llm.py", "--dataset_path", "story.txt", "--max_steps", 60, "--batch_size", 8,
                      "--eval_interval", 20, "--output", "again.pth", "--checkpoint_path", "again_checkpoint.pth",
                      "-y", cwd=folder, columns=columns)
    assert term.wait(timeout=300) == 0, term.output
    return term.output


@pytest.mark.parametrize("columns", [80])
def test_training_bar_at_80_columns(tiny_run, columns):
    output = training_in_a_terminal(tiny_run, columns)
    bars = [p for p in re.split(r"[\r\n]", ANSI.sub("", output)) if "tok/s" in p and "|" in p]
    assert bars, output
    assert all(display_width(b) < columns for b in bars)
    assert all(len(bar_of(b)) >= MIN_BAR for b in bars)
    assert "\x1b[K" in output                          # each draw erases what the last one left


def test_training_at_80_columns(tiny_run):
    assert too_wide(training_in_a_terminal(tiny_run)) == []


def test_convert_at_80_columns(tiny_run):
    term = Terminal80("convert_to_gguf.py", "--gguf_output", "again.gguf", "--output_dir", "again_hf", cwd=tiny_run)
    assert term.wait(timeout=300) == 0, term.output
    assert "Check again.gguf" in term.output
    assert too_wide(term.output) == [], term.output


def test_inference_at_80_columns(tiny_run):
    # A short prompt and few tokens: the generated text is the one thing not wrapped (it streams).
    term = Terminal80("inference_gguf.py", "--gguf_path", "model.gguf.Q4_0.gguf", "--max_tokens", 10,
                      "--threads", 1, cwd=tiny_run)
    term.read_until("> ")
    term.send("/help\n")
    term.read_until("/quit")
    term.read_until("> ")
    term.send("/settings\n")
    term.read_until("top_k off")
    term.read_until("> ")
    term.send("The\n")
    term.read_until("tokens/s")
    term.read_until("> ")
    term.send("\x04")
    assert term.wait() == 0, term.output
    assert too_wide(term.output) == [], term.output
