"""A memory regression gate inside your own test suite: the ``pytest`` plugin.

Two fixtures, each probing your model with :func:`bsfinder.find_batch_size` in fresh
processes (one per trial, under a real memory budget), and failing the test with a message
that says what happened (the batch, the peak, the budget, the baseline), never with a
traceback from bsfinder::

    def test_trains_64_in_2gib(bsfinder_fits):
        bsfinder_fits(Net(), batch=64, input_shape=(3, 224, 224), memory_limit="2GiB")

    def test_largest_batch_has_not_shrunk(bsfinder_probe):
        probe = bsfinder_probe(Net(), input_shape=(3, 224, 224), memory_limit="2GiB")
        assert probe.max_batch >= 512
        probe.check_baseline("baselines/net.json")  # fails on max-batch:-5% by default

Every test that uses them is marked ``bsfinder`` (``pytest -m "not bsfinder"`` skips them);
``--bsfinder-update-baselines`` rewrites the baselines ``check_baseline`` compares against.
Nothing here imports torch when pytest starts: the probe imports it when a test runs.
Docs: docs/integrations/pytest.md. Registered as the ``pytest11`` entry point ``bsfinder``
(or load it with ``-p bsfinder.integrations.pytest_plugin``).
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from bsfinder.core.results import ProbeResult, Trial

__all__ = ["FIXTURES", "MARKER", "UPDATE_OPTION", "Probe"]

#: the marker every test using a bsfinder fixture gets
MARKER = "bsfinder"
#: the fixtures that probe (and make a test ``bsfinder``-marked)
FIXTURES = ("bsfinder_fits", "bsfinder_probe")
#: rewrite the baselines instead of comparing against them
UPDATE_OPTION = "--bsfinder-update-baselines"
#: what ``check_baseline`` fails on unless told: the largest batch shrinking by 5% or more
DEFAULT_FAIL_ON = ("max-batch:-5%",)
#: set by the fixtures, not by the test (they are what the fixture is about)
_SET_BY_FITS = ("start_batch", "max_batch")
_ENFORCE = re.compile(r"\[enforce fail at [^\]]*\] (err == 0\. )?")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bsfinder", "bsfinder memory regression gate")
    group.addoption(
        UPDATE_OPTION,
        action="store_true",
        default=False,
        help="bsfinder_probe(...).check_baseline(PATH): write this run's probe result to "
        "PATH instead of comparing against it (review and commit the files).",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}: the test probes a model with bsfinder in fresh processes (set by the "
        f"{' and '.join(FIXTURES)} fixtures; deselect with -m 'not {MARKER}')",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if set(getattr(item, "fixturenames", ())) & set(FIXTURES):
            item.add_marker(MARKER)


@pytest.fixture
def bsfinder_fits(request: pytest.FixtureRequest) -> Callable[..., Trial]:
    """``bsfinder_fits(model, *, batch, memory_limit, **options) -> Trial``: fail the test
    unless ``batch`` trains (forward, loss, backward, optimizer step) within ``memory_limit``
    in a fresh process.

    ``options`` are :func:`bsfinder.find_batch_size`'s (``input_shape``, ``inputs``,
    ``make_batch``, ``train_step``, ``optimizer``, ``precision``, ``device``...); trials run
    in fresh processes (``isolation="process"``) unless ``isolation`` says otherwise. When
    the batch does not fit, the search goes on down to the largest batch that does (at
    ``granularity``, within ``time_limit``), and the failure says both. Returns the trial at
    ``batch`` (its ``peak_bytes``, ``step_s``, ``samples_per_s``) for further asserts.
    """

    def fits(
        model: Any = None, *, batch: int, memory_limit: int | str | None, **options: Any
    ) -> Trial:
        __tracebackhide__ = True
        _check_options(options, "bsfinder_fits", exclude=_SET_BY_FITS)
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            pytest.fail(
                f"bsfinder_fits: batch must be a positive integer, got {batch!r}", pytrace=False
            )
        if options.get("granularity") == "pow2" and batch & (batch - 1):
            pytest.fail(
                f"bsfinder_fits: batch {batch} is not a power of two, which granularity "
                "'pow2' tries only: give another granularity (or none)",
                pytrace=False,
            )
        result = _probe(
            request, model, memory_limit, {**options, "start_batch": batch, "max_batch": batch}
        )
        trial = result.trial(batch)
        if trial is None:
            pytest.fail(_not_tried(result, batch), pytrace=False)
        if not trial.fits:
            pytest.fail(_does_not_fit(result, trial), pytrace=False)
        return trial

    return fits


@pytest.fixture
def bsfinder_probe(request: pytest.FixtureRequest) -> Callable[..., Probe]:
    """``bsfinder_probe(model, *, memory_limit, **options) -> Probe``: the largest batch
    that fits ``memory_limit``, found by a real probe in fresh processes.

    ``options`` are :func:`bsfinder.find_batch_size`'s. The test fails (with the budget
    and the error) when the probe cannot run or when no batch fits. ``assert
    probe.max_batch >= 512`` fails with the probe's summary; ``probe.check_baseline(path)``
    compares with a stored result as ``bsfinder compare`` does.
    """

    def probe(model: Any = None, *, memory_limit: int | str | None, **options: Any) -> Probe:
        __tracebackhide__ = True
        _check_options(options, "bsfinder_probe")
        result = _probe(request, model, memory_limit, options)
        if result.max_batch is None:
            pytest.fail(_nothing_fits(result), pytrace=False)
        return Probe(
            result,
            base_dir=request.path.parent,
            update=bool(request.config.getoption(UPDATE_OPTION)),
        )

    return probe


class Probe:
    """A probe's result in a test: ``max_batch`` and friends, a one-line ``repr`` (what a
    failed ``assert`` shows), and :meth:`check_baseline`. ``result`` is the full
    :class:`~bsfinder.core.results.ProbeResult`."""

    def __init__(self, result: ProbeResult, *, base_dir: Path, update: bool = False) -> None:
        self.result = result
        self._base_dir = base_dir
        self._update = update

    @property
    def max_batch(self) -> int | None:
        """The largest batch that fits (a lower bound when :attr:`partial`)."""
        return self.result.max_batch

    @property
    def safe_batch(self) -> int | None:
        """The largest batch that leaves the headroom free."""
        return self.result.recommendations.safe_batch

    @property
    def time_optimal_batch(self) -> int | None:
        return self.result.time_optimal_batch

    @property
    def partial(self) -> bool:
        """The probe stopped at its time limit: ``max_batch`` is what it established."""
        return self.result.partial

    @property
    def peak_bytes(self) -> int | None:
        """The peak of the trial at :attr:`max_batch`, in bytes."""
        trial = self.result.trial(self.max_batch) if self.max_batch else None
        return None if trial is None else trial.peak_bytes

    def __repr__(self) -> str:
        return f"<bsfinder probe: {_summary(self.result)}>"

    def check_baseline(
        self, path: str | os.PathLike[str], *, fail_on: Iterable[str] = DEFAULT_FAIL_ON
    ) -> None:
        """Fail the test when this probe regressed against the result stored at ``path``.

        ``fail_on``: thresholds as ``bsfinder compare --fail-on`` takes them
        (``"max-batch:-5%"``, ``"peak-per-sample:+10%"``, ``"samples-per-s:-20%"``,
        ``"time-optimal:-20%"``). A relative ``path`` is relative to the test file's
        folder. With no file there, or with ``--bsfinder-update-baselines``, this run's
        result is written there instead (a missing baseline fails the test: review the
        file and commit it). Differences of device or versions between the two results are
        reported as warnings.
        """
        __tracebackhide__ = True
        from bsfinder.core.compare import compare, parse_threshold
        from bsfinder.core.results import ProbeResult
        from bsfinder.errors import BsfinderWarning, SpecError
        from bsfinder.report.compare import render_comparison

        if isinstance(fail_on, str):
            fail_on = (fail_on,)
        bad = None
        try:
            thresholds = tuple(parse_threshold(t) for t in fail_on)
        except SpecError as exc:
            bad = str(exc).replace("--fail-on ", "fail_on ", 1)
        if bad is not None:
            pytest.fail(f"check_baseline: {bad}", pytrace=False)
        target = _shown(Path(path) if Path(path).is_absolute() else self._base_dir / path)
        if self._update or not target.exists():
            self._write(target, missing=not self._update)
            return
        unreadable = None
        try:
            base = ProbeResult.load(target)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            unreadable = f"{type(exc).__name__}: {exc}"
        if unreadable is not None:
            pytest.fail(
                f"bsfinder baseline {target} could not be read ({unreadable}): rewrite it "
                f"with {UPDATE_OPTION}",
                pytrace=False,
            )
        comparison = compare(base, self.result, thresholds)
        for warning in comparison.warnings:
            warnings.warn(f"bsfinder baseline {target}: {warning}", BsfinderWarning, stacklevel=2)
        if comparison.ok:
            return
        lines = [
            f"bsfinder: regression against the baseline {target}:",
            *(
                f"  {d.metric}: {_value(d.metric, d.base)} in the baseline, "
                f"{_value(d.metric, d.new)} now ({d.change:+.1%}; fails {', '.join(d.failed)})"
                for d in comparison.regressions
                if d.change is not None
            ),
            f"  now: {_summary(self.result)}",
            f"  baseline: {_summary(base)}",
        ]
        if self.partial:
            lines.append(
                "  this probe stopped at its time limit, so its largest batch is a lower "
                "bound: give time_limit= more seconds (or None)"
            )
        lines += [
            "",
            render_comparison(comparison),
            "",
            f"If the change is intended, rewrite the baseline: pytest {UPDATE_OPTION}",
        ]
        pytest.fail("\n".join(lines), pytrace=False)

    def _write(self, target: Path, *, missing: bool) -> None:
        __tracebackhide__ = True
        if self.partial:
            pytest.fail(
                f"bsfinder baseline {target} not written: this probe stopped at its time "
                f"limit ({_summary(self.result)}), and a partial result is no baseline: give "
                "time_limit= more seconds (or None)",
                pytrace=False,
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        self.result.save(target)
        if missing:
            pytest.fail(
                f"bsfinder baseline {target} did not exist: wrote this run's result there "
                f"({_summary(self.result)}). Review it, commit it and rerun; "
                f"{UPDATE_OPTION} rewrites baselines.",
                pytrace=False,
            )


# -- the probe, and its failures in words ----------------------------------------------------


def _check_options(options: dict[str, Any], fixture: str, exclude: Iterable[str] = ()) -> None:
    """Options ``find_batch_size`` does not take fail the test, naming them, before any
    process starts (a typo would otherwise be a TypeError from inside the plugin)."""
    __tracebackhide__ = True
    from bsfinder.api import find_batch_size

    known = set(inspect.signature(find_batch_size).parameters) - {"model", "memory_limit"}
    known -= set(exclude)
    unknown = sorted(set(options) - known)
    if unknown:
        hint = " (set by batch=)" if set(unknown) & set(exclude) else ""
        pytest.fail(
            f"{fixture}: unknown option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}{hint}; it takes find_batch_size's: "
            f"{', '.join(sorted(known))}",
            pytrace=False,
        )


def _probe(
    request: pytest.FixtureRequest,
    model: Any,
    memory_limit: int | str | None,
    options: dict[str, Any],
) -> ProbeResult:
    """``find_batch_size`` in fresh processes; its errors fail the test in their words."""
    __tracebackhide__ = True
    from bsfinder.api import find_batch_size
    from bsfinder.errors import BsfinderError, SpecError, UserCodeError

    options.setdefault("isolation", "process")
    failed = None
    try:
        result = find_batch_size(model, memory_limit=memory_limit, **options)
    except BsfinderError as exc:
        failed = exc
    # failing after the except block: inside it, pytest would print the error it handles too
    if failed is not None:
        message = str(failed).replace(" (rerun with --debug for the traceback)", "")
        what = ": invalid input" if isinstance(failed, SpecError) else " could not probe the model"
        text = f"bsfinder{what}: {message}"
        if isinstance(failed, UserCodeError) and failed.traceback_text.strip():
            if request.config.getoption("verbose") > 0:
                text += "\n\nthe model's traceback, in its trial process:\n"
                text += failed.traceback_text
            else:
                text += " (pytest -v shows the model's traceback)"
        pytest.fail(text, pytrace=False)
    if result.interrupted:  # Ctrl-C in the probe: stop the session as pytest would
        raise KeyboardInterrupt
    return result


def _shown(path: Path) -> Path:
    """``path`` as the messages show it: relative to the working folder when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _budget(result: ProbeResult) -> str:
    from bsfinder.units import format_bytes

    device = result.device
    where = device.get("device") or device.get("kind") or "the device"
    name = device.get("name")
    where = f"{where} ({name})" if name and name != where else where
    if result.capacity_bytes is None:
        return f"on {where}"
    return f"the {format_bytes(result.capacity_bytes)} budget on {where}"


def _peak(trial: Trial, result: ProbeResult) -> str:
    from bsfinder.units import format_bytes

    if trial.peak_bytes is None:
        return "peak not measured"
    text = f"peak {format_bytes(trial.peak_bytes)}"
    if result.capacity_bytes:
        text += f", {trial.peak_bytes / result.capacity_bytes:.0%} of the budget"
    return text


def _summary(result: ProbeResult) -> str:
    """One line: the largest batch, its peak, the next batch tried, the budget, partial."""
    best = result.max_batch
    if best is None:
        return f"nothing fits {_budget(result)}"
    trial = result.trial(best)
    text = f"largest batch that fits {best}"
    if trial is not None:
        text += f" ({_peak(trial, result)})"
    first_failure = result.recommendations.first_failure
    if first_failure is not None:
        text += f", next tried {first_failure} does not fit"
    elif result.recommendations.capped_by_max_batch:
        text += ", the max_batch asked for (larger not tried)"
    text += f", in {_budget(result)}"
    if result.partial:
        text += "; partial: stopped at the time limit, so a lower bound"
    return text


def _why(trial: Trial) -> str:
    reason = {"oom": "out of memory", "crash": "its process died", "timeout": "it hung"}.get(
        trial.failure or "", trial.failure or "it failed"
    )
    # torch's C++ assertion prefix says nothing to a user
    error = _ENFORCE.sub("", " ".join((trial.error or "").split()))
    if error:
        error = error if len(error) <= 240 else error[:237] + "..."
        reason += f" ({error})"
    return reason


def _does_not_fit(result: ProbeResult, trial: Trial) -> str:
    text = f"bsfinder: batch {trial.batch_size} does not fit {_budget(result)}: {_why(trial)}"
    if trial.peak_bytes is not None:
        text += f"; {_peak(trial, result)}"
    best = result.max_batch
    if best is None:
        return text + ". No smaller batch fits either (down to 1)."
    below = result.trial(best)
    peak = f" ({_peak(below, result)})" if below is not None else ""
    bound = " at least (the time limit stopped the search)" if result.partial else ""
    return text + f".\nThe largest batch that fits is {best}{bound}{peak}."


def _nothing_fits(result: ProbeResult) -> str:
    if not result.trials:
        return _not_tried(result, None)
    smallest = min(result.trials, key=lambda t: t.batch_size)
    return (
        f"bsfinder: nothing fits {_budget(result)}: batch {smallest.batch_size} does not "
        f"fit ({_why(smallest)}). Give a larger memory_limit, or a smaller model or inputs."
    )


def _not_tried(result: ProbeResult, batch: int | None) -> str:
    what = "no batch" if batch is None else f"batch {batch}"
    reason = result.search.get("stop_reason") or "the probe ended"
    hint = " (give time_limit= more seconds)" if reason == "time-limit" else ""
    return f"bsfinder: {what} was tried before the probe stopped ({reason}){hint}."


def _value(metric: str, value: float | None) -> str:
    from bsfinder.units import format_bytes, format_rate

    if value is None:
        return "-"
    if metric == "peak-per-sample":
        return f"{format_bytes(int(value))}/sample"
    if metric == "samples-per-s":
        return format_rate(value)
    return f"{value:g}"
