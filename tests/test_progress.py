"""Run progress: a redrawn bar on a terminal, periodic log lines otherwise."""
import io

from pipeline.progress import RunProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_one_redrawn_bar_with_counts_rate_and_eta():
    stream = Terminal()
    progress = RunProgress(10, stream=stream)
    progress.update(3, 1)
    progress.update(4, 1)
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    last = text.split("\r")[-1]
    assert "done 4  failed 1  total 10" in last
    assert "videos/min" in last and "ETA" in last
    assert "[############" in last  # 5 of 10 finished: half of the 30-wide bar


def test_log_file_gets_a_line_every_interval_not_every_update():
    stream = io.StringIO()
    progress = RunProgress(100, stream=stream, log_every=3600)
    for done in range(1, 50):
        progress.update(done, 0)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the closing line
    assert "done 49  failed 0  total 100" in lines[-1]
    assert "\r" not in stream.getvalue()


def test_eta_is_unknown_before_the_first_job_finishes():
    progress = RunProgress(5, stream=io.StringIO())
    assert "ETA ?" in progress.line(progress.started + 1.0)
