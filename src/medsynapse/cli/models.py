"""`predict`, `export`, `serve` and `app`: the commands that load a saved model folder and answer."""

from __future__ import annotations

import argparse
import sys

from medsynapse.cli.common import add_base_options, base_folders, volume_view


def _need_app_extras(command: str, modules: tuple[str, ...]) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise NotImplementedError(f"`medsynapse {command}` needs {', '.join(missing)}: pip install -e '.[app]'")


def cmd_serve(args: argparse.Namespace) -> int:
    _need_app_extras("serve", ("fastapi", "uvicorn"))
    from medsynapse.serve import ServeSettings, serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"medsynapse serve: listening on {args.host}: reachable from other machines; there is no "
              "authentication, put it behind one", file=sys.stderr)
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_new_tokens=args.max_new_tokens, max_pixels=args.max_pixels,
                             max_body_bytes=args.max_body_mb * 2**20, timeout_s=args.timeout,
                             allow_dirs=args.allow_dir or [], max_batch_tokens=args.max_batch_tokens,
                             max_decoded_bytes=args.max_decoded_mb * 2**20 if args.max_decoded_mb else None,
                             engine=args.engine)
    serve(args.model, args.host, args.port, settings, bases=base_folders(args))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    _need_app_extras("app", ("gradio",))
    from medsynapse.app import AppLimits, launch

    limits = AppLimits(max_pixels=args.max_pixels, max_file_bytes=args.max_file_mb * 2**20, timeout_s=args.timeout,
                       max_decoded_bytes=args.max_decoded_mb * 2**20 if args.max_decoded_mb else None)
    launch(args.model, args.compare, args.host, args.port, args.max_new_tokens, bases=base_folders(args),
           limits=limits)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from medsynapse.data.images import load_image
    from medsynapse.model.medsynapse import MedSynapseV

    window = tuple(args.window) if args.window else None
    image = load_image(args.image, window=window, view=volume_view(args))  # a bad image, view or window fails
    # before the model is loaded
    from medsynapse.answers import format_prompt

    model = MedSynapseV.from_pretrained(args.model, merge_adapter=True, bases=base_folders(args))
    question = format_prompt(args.question, model.answer_format)  # as the model was trained to be asked
    print(model.answer([image], [question], max_new_tokens=args.max_new_tokens)[0])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from medsynapse.model.export import export_student

    out = export_student(args.model, args.output, bases=base_folders(args), license_id=args.license,
                         datasets=args.dataset or None)
    print(f"exported to {out}: loads with `medsynapse predict | serve | eval | app --model {out}`, or with "
          "transformers' AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True) (see its README.md)")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    predict = sub.add_parser("predict", parents=[common],
                             help="answer one question about one image (PNG, JPEG, DICOM or a NIfTI volume's "
                                  "slice)")
    predict.add_argument("--model", required=True, help="a MedSynapse folder or a plain local Qwen3-VL folder")
    predict.add_argument("--image", required=True, help="PNG/JPEG, DICOM or NIfTI file")
    predict.add_argument("--question", required=True, help="the question, in words")
    predict.add_argument("--max-new-tokens", type=int, default=16, help="longest answer generated")
    predict.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"),
                         help="DICOM / NIfTI window (e.g. 40 400 for soft tissue); default: the file's own window "
                              "(NIfTI: its cal_min/cal_max, else the slice's range)")
    predict.add_argument("--slice", type=int, default=None,
                         help="NIfTI: the slice (voxel index along the file axis nearest the view's direction); "
                              "default the middle one")
    predict.add_argument("--axis", choices=["axial", "coronal", "sagittal"], default=None,
                         help="NIfTI: the view (reoriented by the affine to the radiological convention); "
                              "default axial")
    predict.add_argument("--mip", type=int, nargs=2, metavar=("FIRST", "LAST"), default=None,
                         help="NIfTI: maximum-intensity projection over slices FIRST..LAST instead of one slice")
    add_base_options(predict)
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser("export", parents=[common],
                            help="an encoder-free student as one self-contained folder (LoRA merged, A_psi, "
                                 "processor, card), loadable by medsynapse and by transformers (trust_remote_code)")
    export.add_argument("--model", required=True, help="an encoder-free student (Stage III) folder")
    export.add_argument("--output", required=True, help="a new folder (or an empty one); written atomically")
    export.add_argument("--license", default="apache-2.0", help="the card's license (default apache-2.0, Qwen3-VL's)")
    export.add_argument("--dataset", action="append", metavar="HUB_ID",
                        help="a training dataset for the card's `datasets` (repeatable; default: the data files the "
                             "student's training record names)")
    add_base_options(export)
    export.set_defaults(func=cmd_export)

    server = sub.add_parser("serve", parents=[common],
                            help="an OpenAI-compatible chat-completions server with dynamic batching")
    server.add_argument("--model", required=True, help="a MedSynapse folder (Stage II with encoder, or a student)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (this machine only by default)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on")
    server.add_argument("--max-batch", type=int, default=16, help="requests answered together at most")
    server.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    server.add_argument("--max-queue", type=int, default=256, help="waiting requests before 503")
    server.add_argument("--max-new-tokens", type=int, default=64, help="default and largest max_tokens")
    server.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image (width x height)")
    server.add_argument("--max-body-mb", type=int, default=32, help="largest request body")
    server.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="generation: transformers (hf) or vLLM with the memory injected (needs .venv-vllm; "
                             "docs/vllm.md)")
    server.add_argument("--timeout", type=float, default=120.0,
                        help="seconds from a request's arrival to its answer, decoding included (504)")
    server.add_argument("--max-batch-tokens", type=int, default=16384,
                        help="a batch's padded size, rows x (longest prompt + max_tokens); prompts are batched by "
                             "length")
    server.add_argument("--max-decoded-mb", type=int, default=None,
                        help="largest inflated gzip'd NIfTI / Deflated DICOM and decoded DICOM pixel data (413); "
                             "default 32 bytes per --max-pixels pixel")
    server.add_argument("--allow-dir", action="append", metavar="DIR",
                        help="local image paths are read under this folder (repeatable; default none)")
    add_base_options(server)
    server.set_defaults(func=cmd_serve)

    app = sub.add_parser("app", parents=[common], help="a browser app: upload a scan, ask, see what the memory used")
    app.add_argument("--model", required=True, help="a MedSynapse folder")
    app.add_argument("--compare", default=None, help="a second folder shown side by side (e.g. the student)")
    app.add_argument("--host", default="127.0.0.1", help="address to bind (this machine only by default)")
    app.add_argument("--port", type=int, default=7860, help="port to listen on")
    app.add_argument("--max-new-tokens", type=int, default=16, help="longest answer generated")
    app.add_argument("--max-pixels", type=int, default=4096 * 4096,
                     help="largest image (width x height), from the header before decoding (as serve)")
    app.add_argument("--max-decoded-mb", type=int, default=None,
                     help="largest inflated gzip'd NIfTI / Deflated DICOM and decoded DICOM pixel data; default 32 "
                          "bytes per --max-pixels pixel (as serve)")
    app.add_argument("--max-file-mb", type=int, default=32, help="largest upload on disk (as serve's --max-body-mb)")
    app.add_argument("--timeout", type=float, default=120.0, help="seconds to check and decode an upload")
    add_base_options(app)
    app.set_defaults(func=cmd_app)
