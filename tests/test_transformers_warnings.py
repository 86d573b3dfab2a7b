"""The guard against transformers renames: importing colt5 (which must print nothing), a short training run
(colt5-train, which ends with a sampled and a greedy generate() with and without the cache) and beam search must not
log at ERROR level, print an "[ERROR]" line, nor raise a deprecation (DeprecationWarning, FutureWarning, or a log
line saying "deprecated") through colt5's code.

It runs in a fresh interpreter: transformers logs most of these once per process (`warning_once`), so in the test
process an earlier test could already have used them up; and the import must be watched from its first line.
"""

import json
import subprocess
import sys
import textwrap

from test_train import TINY_RUN, script_environment

WATCH = textwrap.dedent(
    """
    import contextlib, importlib.util, io, json, logging, os, sys, traceback, warnings

    package = os.path.dirname(importlib.util.find_spec("colt5").origin)
    findings = []

    def through_colt5(stack):
        return any(frame.filename.startswith(package + os.sep) for frame in stack)

    def record(kind, message, stack):
        if through_colt5(stack):
            colt5_frames = [f"{f.filename}:{f.lineno}" for f in stack if f.filename.startswith(package + os.sep)]
            findings.append({"kind": kind, "message": str(message)[:500], "colt5_frames": colt5_frames})

    def show_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            record(category.__name__, message, traceback.extract_stack())

    class Watch(logging.Handler):
        def emit(self, log):
            message = log.getMessage()
            if log.levelno >= logging.ERROR or "deprecat" in message.lower():
                record(f"log {log.levelname} ({log.name})", message, traceback.extract_stack())

    warnings.simplefilter("always")
    warnings.showwarning = show_warning
    import transformers  # its library logger does not propagate to the root logger: watch both
    for logger in (logging.getLogger(), logging.getLogger("transformers")):
        logger.addHandler(Watch(level=logging.WARNING))

    # transformers' docstring checks print their [ERROR] lines (no logging): anything printed by the import counts.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        import colt5
    findings += [{"kind": "printed while importing colt5", "message": line} for line in printed.getvalue().splitlines()]
    import torch
    from colt5.train import main

    main(sys.argv[1:])
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[sys.argv.index("--output-dir") + 1]).eval()
    model.generate(torch.randint(3, 259, (2, 24)), max_new_tokens=8, num_beams=2)
    print("FINDINGS " + json.dumps(findings))
    """
)


def test_import_training_and_generation_raise_no_deprecation_and_log_no_error(tmp_path):
    argv = [*TINY_RUN, "--steps", "4", "--eval-steps", "2", "--gradient-checkpointing", "--sample-tokens", "70",
            "--output-dir", str(tmp_path / "run")]
    run = subprocess.run([sys.executable, "-c", WATCH, *argv], env=script_environment(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    findings = json.loads(run.stdout.rsplit("FINDINGS ", 1)[1])
    assert findings == [], json.dumps(findings, indent=2)
    assert "[ERROR]" not in run.stdout + run.stderr
