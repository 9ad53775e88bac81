"""Scripts and notebooks get fresh trial processes: what is defined in ``__main__`` travels
by value (cloudpickle), and what cannot travel is said on stderr (issue 12, item 3)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from bsfinder import SpecError, find_batch_size
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="RLIMIT_AS budget is Linux"
)

# A small CNN, the same source in a module file (for the CLI) and in a script's __main__.
NET = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
            )

        def forward(self, x):
            return self.body(x)
    """
)
BUDGET = "128MiB"


def _run(script: str, tmp_path: Path, *args: str, env: dict | None = None) -> tuple[dict, str]:
    """Run ``script`` as ``python script.py`` (its objects live in ``__main__``); the JSON
    it prints last, and its stderr."""
    path = tmp_path / "script.py"
    path.write_text(script)
    proc = subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow  # two full probes: ~30 s on 2 idle cores
def test_a_main_class_gets_the_answer_the_cli_gets_for_its_module(tmp_path) -> None:
    # GIVEN the same CNN as a class in a script's __main__ and in a module file
    (tmp_path / "net.py").write_text(NET)
    script = NET + textwrap.dedent(
        f"""
        import json
        from bsfinder import find_batch_size

        if __name__ == "__main__":
            r = find_batch_size(Net, input_shape=(3, 32, 32), device="cpu",
                                memory_limit="{BUDGET}", steps=1, start_batch=16)
            print(json.dumps({{"max_batch": r.max_batch, "isolation": r.runner["isolation"],
                              "notes": list(r.notes)}}))
        """
    )
    # WHEN the script probes it through the API, and the CLI probes the module's class
    api, stderr = _run(script, tmp_path)
    out = tmp_path / "cli.json"
    # a subprocess: importing net.py here would leave it in this interpreter's sys.modules
    proc = run_cli("probe", f"{tmp_path / 'net.py'}:Net", "--input", "3x32x32", "--device", "cpu",
                   "--memory-limit", BUDGET, "--steps", "1", "--start-batch", "16",
                   "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # THEN the script's trials ran in fresh processes, silently, and agree with the CLI's
    assert api["isolation"] == "process", api["notes"]
    assert "BsfinderWarning" not in stderr
    cli_max = json.loads(out.read_text())["recommendations"]["max_batch"]
    assert cli_max >= 32
    assert abs(api["max_batch"] - cli_max) <= 8, (api["max_batch"], cli_max)


def test_main_closures_run_in_trial_processes_and_leave_the_users_objects_alone(
    tmp_path,
) -> None:
    # GIVEN a script whose model object, make_batch lambda and train_step closure (over a
    # model with BatchNorm and its AdamW optimizer) are all defined in __main__
    script = textwrap.dedent(
        """
        import json, os
        import torch
        from torch import nn
        from bsfinder import find_batch_size


        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(16, 32)
                self.bn = nn.BatchNorm1d(32)
                self.out = nn.Linear(32, 4)

            def forward(self, x):
                return self.out(self.bn(self.lin(x)).relu())


        if __name__ == "__main__":
            torch.manual_seed(0)
            kw = dict(device="cpu", memory_limit="256MiB", start_batch=2, max_batch=8,
                      granularity="pow2", steps=1)
            model = Net()
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=0.1)
            model(torch.randn(4, 16)).sum().backward()
            opt.step()  # the optimizer has state, the BatchNorm running statistics moved
            opt.zero_grad()
            state = {k: v.clone() for k, v in model.state_dict().items()}
            opt_state = {k: {n: t.clone() for n, t in v.items()}
                         for k, v in opt.state_dict()["state"].items()}
            fresh = Net()
            rng = torch.get_rng_state()
            pids = []

            def make_batch(b):
                return torch.randn(b, 16)

            def step(b):
                pids.append(os.getpid())
                loss = model(torch.randn(b, 16)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()

            batch = find_batch_size(fresh, make_batch=lambda b: make_batch(b), **kw)
            stepped = find_batch_size(train_step=step, optimizer=opt, **kw)
            same = all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
            now = opt.state_dict()["state"]
            same_opt = all(torch.equal(t, opt_state[k][n]) for k, v in now.items()
                           for n, t in v.items())
            print(json.dumps({
                "make_batch": [batch.runner["isolation"], batch.max_batch],
                "train_step": [stepped.runner["isolation"], stepped.max_batch],
                "steps_run": [t.steps_run for t in stepped.trials],
                "pids": pids, "weights_and_buffers_same": same, "optimizer_same": same_opt,
                "rng_same": torch.equal(torch.get_rng_state(), rng),
                "grads_none": all(p.grad is None for p in model.parameters()),
                "training": model.training,
            }))
        """
    )
    result, stderr = _run(script, tmp_path)
    # THEN both probes ran in trial processes (a copy of the model and optimizer stepped
    # there: the closure never ran here), and the user's objects are exactly as before
    assert result["make_batch"] == ["process", 8], stderr[-2000:]
    assert result["train_step"] == ["process", 8], stderr[-2000:]
    assert result["steps_run"] and all(n == 2 for n in result["steps_run"])
    assert result["pids"] == []
    assert result["weights_and_buffers_same"] and result["optimizer_same"]
    assert result["rng_same"] and result["grads_none"] and result["training"]
    assert "BsfinderWarning" not in stderr


def test_what_cannot_travel_warns_on_stderr_and_process_isolation_says_why(tmp_path) -> None:
    # GIVEN a script whose model holds a lock (no pickle can carry one)
    script = textwrap.dedent(
        """
        import json, threading
        import torch
        from bsfinder import find_batch_size

        model = torch.nn.Linear(8, 8)
        model.lock = threading.Lock()
        r = find_batch_size(model, input_shape=(8,), device="cpu", memory_limit="128MiB",
                            max_batch=2, granularity="pow2", steps=1)
        print(json.dumps({"isolation": r.runner["isolation"], "max_batch": r.max_batch}))
        """
    )
    result, stderr = _run(script, tmp_path)
    # THEN it runs in-process, and stderr (Python's default warning filters) says so, why,
    # and what it costs, pointing at the user's own line
    assert result == {"isolation": "inline", "max_batch": 2}
    assert re.search(
        r"script\.py:\d+: BsfinderWarning: bsfinder runs this probe's trials in this process",
        stderr,
    ), stderr
    assert "cannot pickle '_thread.lock' object" in stderr
    assert "may be lower than a fresh training process" in stderr


def test_process_isolation_refuses_what_cannot_travel_with_the_reason() -> None:
    model = torch.nn.Linear(8, 8)
    model.lock = threading.Lock()  # type: ignore[assignment]
    with pytest.raises(SpecError, match=r"isolation='process' is impossible.*_thread\.lock"):
        find_batch_size(model, input_shape=(8,), device="cpu", memory_limit="64MiB",
                        isolation="process")  # fmt: skip
    lock = threading.Lock()

    def step(batch_size: int) -> None:
        with lock:
            pass

    with pytest.raises(SpecError, match=r"train_step cannot be pickled, even by value"):
        find_batch_size(train_step=step, device="cpu", memory_limit="64MiB",
                        isolation="process")  # fmt: skip
    # AND under "auto" the same step warns (here: pytest's capture) and runs in-process
    with pytest.warns(UserWarning, match=r"train_step cannot be pickled") as caught:
        result = find_batch_size(train_step=step, device="cpu", memory_limit="64MiB",
                                 max_batch=1, steps=1)  # fmt: skip
    assert result.runner["isolation"] == "inline"
    assert caught[0].category.__name__ == "BsfinderWarning"
    assert caught[0].filename == __file__  # the user's call, not bsfinder's internals


def test_an_isolation_inline_request_is_not_warned_about() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = find_batch_size(lambda: torch.nn.Linear(4, 4), input_shape=(4,),
                                 device="cpu", memory_limit="64MiB", max_batch=1, steps=1,
                                 isolation="inline")  # fmt: skip
    assert result.runner["isolation"] == "inline"


def test_a_train_step_imports_its_libraries_before_the_budget_and_its_module_under_it(
    tmp_path,
) -> None:
    # GIVEN a user module (importing it builds its state) that imports a library
    (tmp_path / "usermod.py").write_text(
        "import colorsys\n\nSTATE = []\n\ndef step(b):\n    STATE.append(colorsys.ONE_THIRD)\n"
    )
    script = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, ".")
        import usermod
        from bsfinder.execution.placement import _by_value

        blob, why = _by_value(usermod.step)
        assert not why, why
        open("step.bin", "wb").write(blob)
        print(json.dumps({}))
        """
    )
    _run(script, tmp_path)
    check = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, ".")
        from bsfinder.workload.step import _import_libraries

        before = "colorsys" in sys.modules
        _import_libraries(open("step.bin", "rb").read())
        print(json.dumps([before, "colorsys" in sys.modules, "usermod" in sys.modules]))
        """
    )
    # WHEN a fresh process (a trial's, before its budget) reads the step's libraries
    result, _ = _run(check, tmp_path)
    # THEN the library is imported and the user's module is left for the budget
    assert result == [False, True, False]


def test_a_keras_model_travels_unless_keras_cannot_rebuild_its_class(tmp_path) -> None:
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")
    # GIVEN train_steps running Keras 3 (torch backend): a Sequential and a subclass, both
    # made in __main__
    script = textwrap.dedent(
        """
        import json
        import numpy as np
        import keras
        from bsfinder.execution.placement import _what_travels


        class Sub(keras.Model):
            def __init__(self):
                super().__init__()
                self.d = keras.layers.Dense(4)

            def call(self, x):
                return self.d(x)


        seq = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        sub = Sub()
        for m in (seq, sub):
            m.compile(optimizer="adam", loss="mse")
            m.train_on_batch(np.zeros((2, 8), "float32"), np.zeros((2, 4), "float32"))

        def fit_seq(b):
            seq.fit(np.zeros((b, 8), "float32"), np.zeros((b, 4), "float32"), verbose=0)

        def fit_sub(b):
            sub.train_on_batch(np.zeros((b, 8), "float32"), np.zeros((b, 4), "float32"))

        out = {}
        for name, step in (("seq", fit_seq), ("sub", fit_sub)):
            travel, reasons = _what_travels(None, model_kwargs={}, make_batch=None,
                                            train_step=step)
            out[name] = [travel["train_step"] is not None, reasons]
        print(json.dumps(out))
        """
    )
    result, _ = _run(script, tmp_path, env={"KERAS_BACKEND": "torch"})
    # THEN the Sequential travels (Keras pickles it, a fresh process rebuilds it), and the
    # subclass, which Keras cannot find by name in another process, stays with its reason
    assert result["seq"] == [True, []]
    assert result["sub"][0] is False
    assert "Keras cannot rebuild" in result["sub"][1][0]
    assert "Could not locate class 'Sub'" in result["sub"][1][0]


def test_code_loaded_from_a_file_path_travels_by_value(tmp_path) -> None:
    from bsfinder.execution.placement import _by_value
    from bsfinder.workload.loading import load_object

    # GIVEN a factory from 'path/file.py:make' (a module no other process can import by name)
    (tmp_path / "pathmod.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Linear(3, 5)\n"
    )
    make = load_object(f"{tmp_path / 'pathmod.py'}:make")
    blob, why = _by_value(make)
    assert blob is not None and why == ""
    (tmp_path / "make.bin").write_bytes(blob)
    # WHEN a fresh process loads it THEN it builds the model from the code it carries
    check = textwrap.dedent(
        """
        import json
        from bsfinder.workload.step import _unpickle

        model = _unpickle(open("make.bin", "rb").read())()
        print(json.dumps(list(model.weight.shape)))
        """
    )
    result, _ = _run(check, tmp_path)
    assert result == [5, 3]
