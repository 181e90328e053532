"""Download a Hugging Face model repo into checkpoints/<repo_id> for convert_hf_checkpoint.py.

    python scripts/download.py --repo_id meta-llama/Llama-2-7b-chat-hf [--hf_token hf_...]

Only what conversion needs is fetched: configs, tokenizer files and the weights (safetensors when the repo has
them, pytorch_model*.bin otherwise); the `original/` copies of Meta's weights are skipped.
"""
import argparse
import sys
from pathlib import Path

WANTED = ["*.json", "tokenizer.model", "*.safetensors"]


def download(repo_id: str, checkpoint_dir: Path, hf_token=None) -> Path:
    from huggingface_hub import snapshot_download
    snapshot_download(repo_id, local_dir=checkpoint_dir, token=hf_token, allow_patterns=WANTED)
    if not list(checkpoint_dir.glob("*.safetensors")):  # an older repo with pickled weights only
        snapshot_download(repo_id, local_dir=checkpoint_dir, token=hf_token, allow_patterns=["pytorch_model*.bin"])
    return checkpoint_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo_id", required=True, help="Hugging Face repo, e.g. meta-llama/Llama-3.2-1B-Instruct")
    parser.add_argument("--hf_token", default=None,
                        help="access token for gated repos (default: $HF_TOKEN or the cached `hf auth login` token)")
    parser.add_argument("--checkpoint_dir", type=Path, default=None, help="where to put it (default: checkpoints/<repo_id>)")
    args = parser.parse_args(argv)
    out = args.checkpoint_dir or Path("checkpoints") / args.repo_id
    try:
        import huggingface_hub  # noqa: F401  (fail early with one line, before any work)
    except ImportError:
        print("error: huggingface_hub is not installed; install it with: pip install huggingface_hub", file=sys.stderr)
        sys.exit(2)
    try:
        download(args.repo_id, out, args.hf_token)
    except Exception as e:  # the hub's errors are many (offline, gated, typo); each comes down to one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: could not download {args.repo_id} ({type(e).__name__}: {reason}); check the repo id, the "
              f"network, and --hf_token for gated repos", file=sys.stderr)
        sys.exit(2)
    print(f"downloaded {args.repo_id} to {out}; next: python convert_hf_checkpoint.py --checkpoint_dir {out}")


if __name__ == "__main__":
    main()
