"""Run `mgtq calibrate` in child processes that SIGKILL themselves at chosen points, one after another.

    python calibrate_and_die.py RECIPE OUT=POINT [OUT=POINT ...]   → prints each child's exit status as JSON

A child is killed by SIGKILL, so no cleanup of any kind runs (as with `kill -9` from outside); the
next child resumes the same run folder. The children are forked from this process after it has
imported mgtq, so each kill point costs the calibration work only, not a Python start-up.

POINT: synth (second synthesis batch, after the first batch's shard is written: every child synthesizes
one batch a shard), qat-save (while the second QAT state of this process is
written), qat-swap (between the two renames that put a QAT state in place where folders cannot be
exchanged in one step), qat-exchanged (right after the exchange that put one in place, the old state not yet
deleted), qat-step:N (in the N-th
training step of this process), magnitudes (while activations are recorded), secondary (while its
folder is written), none.
"""

import os
import signal
import sys


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def after_calls(n, fn):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            die()
        return fn(*args, **kwargs)

    return wrapper


def install(point: str) -> None:
    import torch

    from mgtq.pipeline import MGTPipeline
    from mgtq.scq import magnitudes, qat, secondary
    from mgtq.training import state

    if point == "synth":
        MGTPipeline.__call__ = after_calls(2, MGTPipeline.__call__)
    elif point == "qat-save":
        real = state.write_json

        def write_json(path, data, _seen=[]):
            if path.name == state.STATE_FILE:
                _seen.append(path)
                if len(_seen) == 2:
                    die()  # trainer.json and the tensors are written, state.json is not: a half-written state
            return real(path, data)

        state.write_json = write_json
    elif point == "qat-exchanged":
        import mgtq.files

        real_exchange = mgtq.files._exchange

        def exchange(a, b):
            done = real_exchange(a, b)
            if done and os.path.basename(b) == "qat-state":
                die()  # the new state is in place, the old one under the temporary name, not yet deleted
            return done

        mgtq.files._exchange = exchange
    elif point == "qat-swap":
        import mgtq.files

        mgtq.files._exchange = lambda a, b: False  # the two renames of systems without an atomic exchange
        real_replace = os.replace

        class Os:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                real_replace(src, dst)
                if os.path.basename(dst).startswith(".qat-state.old-"):
                    die()  # the old state is moved aside, the new one not yet in place

        mgtq.files.os = Os()
    elif point.startswith("qat-step:"):
        n, real_loss, calls = int(point.split(":")[1]), qat.qat_loss, {"n": 0}

        def qat_loss(*args, **kwargs):
            calls["n"] += torch.is_grad_enabled()  # training steps, not the no-grad evaluations
            if calls["n"] == n:
                die()
            return real_loss(*args, **kwargs)

        qat.qat_loss = qat_loss
    elif point == "magnitudes":
        real_batches = magnitudes.calibration_batches

        def batches(*args, **kwargs):
            for i, batch in enumerate(real_batches(*args, **kwargs)):
                if i == 1:
                    die()
                yield batch

        magnitudes.calibration_batches = batches
    elif point == "secondary":
        secondary.plot_magnitudes = lambda *args, **kwargs: die()
    elif point != "none":
        raise SystemExit(f"unknown point {point}")


def run_child(point: str, recipe: str, out: str) -> int | str:
    """Exit code of a forked `mgtq calibrate`, or the name of the signal that ended it."""
    from mgtq.cli import main

    pid = os.fork()
    if pid == 0:
        try:
            install(point)
            code = main(["calibrate", "--recipe", recipe, "--out", out, "--no-progress"])
        except BaseException as err:  # noqa: BLE001 — report, never return into the parent's code
            print(f"{point}: {type(err).__name__}: {err}", file=sys.stderr)
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


if __name__ == "__main__":
    import json

    import mgtq.cli  # noqa: F401 — everything the children need, imported once
    import mgtq.pipeline  # noqa: F401
    import mgtq.scq.calibrate  # noqa: F401
    from mgtq.scq import synthesis

    synthesis.SHARD_PROMPTS = 1  # rounded up to one batch a shard: the synth kill lands after a shard is written

    recipe, *children = sys.argv[1:]
    print(json.dumps([run_child(child.rpartition("=")[2], recipe, child.rpartition("=")[0]) for child in children]))
