"""The ``immiscible-diffusers`` command: publish a training run's output folder to the Hugging Face Hub.

    immiscible-diffusers push OUTPUT_DIR --repo-id user/name [--private] [--revision BRANCH] ...
    immiscible-diffusers card OUTPUT_DIR --evaluation-dir EVAL_DIR
    immiscible-diffusers stock-scheduler OUTPUT_DIR

Exit status: 0 on success, 2 for input to fix (the message says what), 1 when the Hub could not be
reached or refused (the message gives the command that retries; the local folder is unchanged).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .arguments import add_debug_arg
from .errors import EXIT_USER_ERROR, USER_ERRORS, debug_requested
from .hub import (
    DEFAULT_COMMIT_MESSAGE,
    LORA_WEIGHTS_NAME,
    HubPushError,
    check_repo_id,
    convert_to_stock_scheduler,
    plan_push,
    push_output_dir,
    resolve_token,
)
from .model_card import add_evaluation_to_card, check_model_card

PUSH_DESCRIPTION = """\
Publish a training run's output folder (the pipeline saved with stock diffusers classes, its model card
README.md, samples/, training_config.json, train_log.csv) to a model repository on the Hugging Face Hub,
in one commit. The folder is checked first, without any network call: a pipeline that plain diffusers
loads (stock scheduler class, safetensors weights, no pickles) and a model card with the Hub metadata.
Checkpoints (checkpoint-*/), logs/, *.log and temporary files stay local. The token comes from --token,
HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub. The local folder is never modified (except
with --evaluation-dir, which adds the evaluation to its card first).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="immiscible-diffusers",
        description="Publish immiscible-diffusers training runs to the Hugging Face Hub.",
    )
    add_debug_arg(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{push,card,stock-scheduler}")

    push = commands.add_parser(
        "push",
        help="Upload an output folder to a Hub model repository.",
        description=PUSH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("output_dir", metavar="OUTPUT_DIR", help="A training run's --output_dir.")
    push.add_argument(
        "--repo-id",
        default=None,
        help="The model repository, 'user/name' or 'org/name' ('name' alone: under the token's user). "
        "Created if missing.",
    )
    push.add_argument("--private", action="store_true", help="Create the repository as private (if it is new).")
    push.add_argument(
        "--revision", default=None, metavar="BRANCH", help="Commit to this branch (created from main if missing)."
    )
    push.add_argument(
        "--token",
        default=None,
        help="A Hub token with write access (default: HF_TOKEN or `hf auth login`, which keep it out of the shell "
        "history).",
    )
    push.add_argument(
        "--commit-message", default=None, help="The commit message (default: 'Upload pipeline trained with ...')."
    )
    push.add_argument(
        "--include-checkpoints",
        action="store_true",
        help="Also publish the models saved in checkpoint-*/ (unet/, unet_ema/ ...), never their training state "
        "(optimizer, RNG pickles).",
    )
    push.add_argument(
        "--evaluation-dir",
        default=None,
        help="The --output_dir of `python -m immiscible_diffusers.evaluate`: add its quality-vs-steps plot and "
        "table to the card (written into OUTPUT_DIR/evaluation/ and README.md) before pushing.",
    )
    push.add_argument(
        "--dry-run", action="store_true", help="Check the folder and list what would be pushed; no network call."
    )

    card = commands.add_parser(
        "card",
        help="Add an evaluation (quality-vs-steps plot and table) to an output folder's model card.",
        description="Copy quality.png, quality.md and quality.csv from the evaluator's output folder into "
        "OUTPUT_DIR/evaluation/ and show them in OUTPUT_DIR/README.md (replacing an earlier evaluation section); "
        "then check the card as `push` would.",
    )
    card.add_argument("output_dir", metavar="OUTPUT_DIR", help="A training run's --output_dir (with README.md).")
    card.add_argument(
        "--evaluation-dir", required=True, help="The --output_dir of `python -m immiscible_diffusers.evaluate`."
    )

    stock = commands.add_parser(
        "stock-scheduler",
        help="Replace an immiscible scheduler in a saved pipeline with its stock diffusers class.",
        description="Rewrite OUTPUT_DIR/scheduler/ and model_index.json with the stock diffusers class of the "
        "Immiscible* scheduler saved there, so that plain diffusers loads the pipeline. Sampling is unchanged: "
        "inference does not depend on how the noise was paired in training.",
    )
    stock.add_argument("output_dir", metavar="OUTPUT_DIR", help="A folder saved with save_pretrained.")
    return parser


def _push(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.repo_id is None and not args.dry_run:
        parser.error("the following arguments are required: --repo-id")
    if args.repo_id is not None:
        check_repo_id(args.repo_id, "--repo-id")
    if args.evaluation_dir is not None and args.dry_run:
        raise ValueError(
            "--evaluation-dir writes into OUTPUT_DIR, which --dry-run never does: run it without --dry-run"
        )
    if args.evaluation_dir is not None:
        card_path = add_evaluation_to_card(args.output_dir, args.evaluation_dir)
        print(f"Added the evaluation from {args.evaluation_dir} to {card_path}")
    # A LoRA run saves adapter weights instead of a pipeline.
    lora = not os.path.isfile(os.path.join(args.output_dir, "model_index.json")) and os.path.isfile(
        os.path.join(args.output_dir, LORA_WEIGHTS_NAME)
    )
    required_file = LORA_WEIGHTS_NAME if lora else "model_index.json"
    plan = plan_push(args.output_dir, required_file=required_file, include_checkpoints=args.include_checkpoints)
    if args.dry_run:
        print(f"Would push {plan.describe()}")
        print("\n".join(f"  {name}" for name in plan.files))
        return 0
    resolve_token(args.token)  # before printing anything that suggests the push started
    branch = f" (branch {args.revision})" if args.revision else ""
    print(f"Pushing {plan.describe()}\nto {args.repo_id}{branch}")
    url = push_output_dir(
        args.output_dir,
        args.repo_id,
        token=args.token,
        private=args.private,
        commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
        revision=args.revision,
        include_checkpoints=args.include_checkpoints,
        required_file=required_file,
        plan=plan,
    )
    print(f"Pushed: {url}")
    return 0


def _card(args: argparse.Namespace) -> int:
    path = add_evaluation_to_card(args.output_dir, args.evaluation_dir)
    check_model_card(path)
    print(f"Added the evaluation from {args.evaluation_dir} to {path} (files in {path.parent / 'evaluation'}/)")
    return 0


def _stock_scheduler(args: argparse.Namespace) -> int:
    name = convert_to_stock_scheduler(args.output_dir)
    print(f"{args.output_dir}: the scheduler is now diffusers' {name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return the exit status (errors go to stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "push":
            return _push(args, parser)
        if args.command == "card":
            return _card(args)
        return _stock_scheduler(args)
    except HubPushError as error:
        print(f"immiscible-diffusers {args.command}: error: {error}", file=sys.stderr)
        return 1
    except USER_ERRORS as error:  # as every entry point does (immiscible_diffusers.errors)
        if args.debug or debug_requested():
            raise
        message = " ".join((str(error) or type(error).__name__).split())
        print(f"immiscible-diffusers {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
