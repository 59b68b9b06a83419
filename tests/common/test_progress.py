"""Progress lines (qpo_ray.common.progress): a bar on a terminal, lines elsewhere."""

from __future__ import annotations
import io
import re
from qpo_ray.common.progress import Progress


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    log = io.StringIO()
    progress = Progress("train_1", 4, "steps", stream=log, every_s=0)
    for step in range(1, 5):
        progress.update(step, loss=2.5 / step, **{"samples/s": 8.0})
    progress.close()  # the last update already said it all: no second line
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in log.getvalue()
    assert re.fullmatch(r"\[qpo\] train_1: 1/4 steps, loss 2\.5, samples/s 8, ETA \d+ s",
                        lines[0])
    assert lines[3].startswith("[qpo] train_1: 4/4 steps, loss 0.625")
    # a phase shorter than `every_s`: only its last line
    quiet = io.StringIO()
    progress = Progress("augment_1: generating", 3, "prompts", stream=quiet, every_s=3600)
    for done in (1, 2, 3):
        progress.update(done)
    progress.close()
    assert re.fullmatch(r"\[qpo\] augment_1: generating: 3/3 prompts, \d+ s\n",
                        quiet.getvalue())

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    bar = Progress("step0: scoring", 10, "pairs", stream=tty, every_s=3600)
    bar.update(5)
    bar.update(10)
    bar.close()
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("\n")
    assert "[############------------] 5/10 pairs" in tty.getvalue()
