"""Run one of these scripts with gemv.py's (or decode_attention.py's) tile settings changed in-process, so that a
tile can be timed end to end before it is written into the kernel file.

    python scripts/with_config.py scripts/bench.py INT4_XQ_CONFIG.BLOCK_W=128 -- --model Llama-2-7B --quant int4
    python scripts/with_config.py scripts/gemv_sweep.py INT8_CONFIG+INT8_GATE_CONFIG.STAGES=3 -- --rows 1
    python scripts/with_config.py scripts/bench.py INT4_XQ_ROWS=0 decode_attention.CHUNK=128 -- --model Llama-2-7B

Each setting is one of
    NAME=V                 a module-level setting of gemv.py (INT4_XQ_ROWS=0), V a Python literal;
    module.NAME=V          the same in decode_attention.py or gemv.py (decode_attention.BLOCK_L=32);
    CONFIG[+CONFIG].KEY=V  a key of one or more of gemv.py's tile dicts (INT4_CONFIG.BLOCK_N=16);
    CONFIG="v1, v2, ..."   a tile dict's values in its own key order (INT4_GATE_CONFIG="4, 256, 4, 1").
Everything after `--` goes to the script. The settings are printed first, so that a log says what ran.
"""
import ast
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import decode_attention  # noqa: E402
import gemv  # noqa: E402

MODULES = {"gemv": gemv, "decode_attention": decode_attention}


def apply(setting: str) -> None:
    """Change one setting in place (dicts are mutated, so code that reads them at call time sees the change)."""
    target, sep, text = setting.partition("=")
    if not sep:
        raise ValueError(f"setting {setting!r} has no '=': write NAME=V or CONFIG.KEY=V")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{text!r} in {setting!r} is not a Python literal (a number, True, or '4, 256, 4, 1')")
    head, _, key = target.partition(".")
    if head in MODULES:
        module, name = MODULES[head], key
    elif key:  # CONFIG[+CONFIG].KEY
        for name in head.split("+"):
            config = getattr(gemv, name, None)
            if not isinstance(config, dict):
                raise ValueError(f"gemv.py has no tile dict {name!r}; see the *_CONFIG names at its top")
            config[key] = value
        return
    else:
        module, name = gemv, head
    if not hasattr(module, name):
        raise ValueError(f"{module.__name__}.py has no setting {name!r}; see the names at its top")
    old = getattr(module, name)
    if isinstance(old, dict) and isinstance(value, tuple):  # CONFIG="v1, v2, ...": the dict's keys in order
        if len(value) != len(old):
            raise ValueError(f"{name} takes {len(old)} values ({', '.join(old)}), not {len(value)}")
        value = dict(zip(old, value))
        old.update(value)
        return
    setattr(module, name, value)


def main(argv):
    split = argv.index("--") if "--" in argv else len(argv)
    if split < 1:
        sys.exit("usage: python scripts/with_config.py SCRIPT SETTING... [-- SCRIPT ARGS]")
    script, settings, rest = argv[0], argv[1:split], argv[split + 1:]
    if not Path(script).is_file():
        sys.exit(f"error: no script {script}; give a path such as scripts/bench.py")
    try:
        for setting in settings:
            apply(setting)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"with {' '.join(settings) or 'no changes'}", flush=True)
    sys.path.insert(0, str(Path(script).resolve().parent))
    sys.argv = [script] + rest
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
