"""Stage 3: export the trained model to Hugging Face format and to GGUF, then quantize it.

    python convert_to_gguf.py                      # hf_model/, model.gguf, model.gguf.Q4_0.gguf
    python convert_to_gguf.py --quant_type Q8_0
    python convert_to_gguf.py --quant_type Q8_0,Q4_0,Q4_K_M   # several types, and what each costs
    python convert_to_gguf.py --report             # a standard set of types, and what each costs

No llama.cpp checkout is needed: the GGUF is written with the `gguf` package and quantized by
llama.cpp's own quantizer inside llama-cpp-python. Every file is written under a temporary name and
checked against the PyTorch model (same tokens, same logits within float tolerance; a windowed
model's logits in passes of 8 blocks, and its greedy text from the unquantized GGUF past the block
twice); only when every check passes do they all move into place, so a failed check or a full disk replaces nothing. With
several types (or --report) a table follows: size, bits per weight, perplexity through llama.cpp on held-out text,
its ratio to the PyTorch model's perplexity on the same windows, and top-1 next-token agreement.
"""

import os
import time

from custom_llm import isolated
from custom_llm.architectures import check_length
from custom_llm.atomic import remove_stale_temporaries, staging
from custom_llm.chat_format import template_of_config
from custom_llm.checks import (HARD_STRINGS, chat_prompts, check_chat, check_export, check_greedy, check_windows,
                               greedy_prompt, held_out_tokens)
from custom_llm.cli import ArgumentParser, run
from custom_llm.corpus import spec_text
from custom_llm.errors import UserError
from custom_llm.evaluation import evaluation_windows, pytorch_logits, report_table, score
from custom_llm.export import (FORMATS, GGUF, block_size, check_quant_type, fallback_tensors, quantize, tensor_types,
                               write_gguf)
from custom_llm.files import check_tokenizer_fits, load_config, load_trained_model
from custom_llm.isolated import LlamaCrash
from custom_llm.resources import human_bytes
from custom_llm.terminal import say
from custom_llm.tokenizer import END_OF_TEXT, encode, load_tokenizer

# What --report quantizes to when --quant_type does not say: from near-lossless to 2-bit.
REPORT_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]


def parse_quant_types(text):
    """'Q8_0,Q4_0' -> ['Q8_0', 'Q4_0'], each checked, duplicates dropped."""
    names = [check_quant_type(name.strip()) for name in text.split(",") if name.strip()]
    if not names:
        raise UserError(f"--quant_type {text!r} names no type; e.g. Q4_0 or Q8_0,Q4_0,Q4_K_M", 2)
    return list(dict.fromkeys(names))


def parse_args():
    parser = ArgumentParser(description="Export the trained model to Hugging Face and GGUF, quantized.")
    parser.add_argument("--model_path", default="trained_model.pth")
    parser.add_argument("--config_path", default="model_config.pth")
    parser.add_argument("--tokenizer_path", default="tokenizer.json")
    for export_format in FORMATS:
        parser.add_argument(f"--{export_format.flag}", default=export_format.default,
                            help=f"where to write the {export_format.description} export (default: %(default)s)")
    parser.add_argument("--quant_type", default=None,
                        help="llama.cpp quantization type(s), comma-separated (default Q4_0; e.g. Q8_0,Q4_K_M)")
    parser.add_argument("--report", action="store_true",
                        help="print what each type costs (perplexity, agreement); without --quant_type, "
                             f"quantizes to {','.join(REPORT_TYPES)}")
    parser.add_number("eval_tokens", 32768)
    parser.add_argument("--llama_cpp_path", default=None,
                        help="optional llama.cpp checkout whose llama-quantize to use instead")
    parser.add_argument("--eval_text", default=None,
                        help="held-out text for the checks and the report (default: the validation part of "
                             "the training text recorded in the config: its held-out files, or its last 10%%)")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.quant_type is None:
        quant_types = REPORT_TYPES if args.report else ["Q4_0"]
    else:
        quant_types = parse_quant_types(args.quant_type)
    show_report = args.report or len(quant_types) > 1

    config, tokenizer, model = load_model(args)
    held_out, windows, prompts, greedy = what_to_check_on(args, config, tokenizer, show_report)
    quantized = {quant_type: f"{args.gguf_output}.{quant_type}.gguf" for quant_type in quant_types}
    export_and_check(args, model, tokenizer, quantized, windows, prompts, greedy)
    if show_report:
        print_report(model, held_out.tokens, held_out.source, args, {"F16": args.gguf_output, **quantized})
    suggested = quantized.get("Q4_0", quantized[quant_types[0]])
    say(f"Done. Try it:\n  python inference_gguf.py --gguf_path {suggested} "
        + ("--chat" if template_of_config(config, tokenizer) else "--query \"Hello\""))


def load_model(args):
    """The config, the tokenizer and the trained model, checked to belong together."""
    config = load_config(args.config_path)
    tokenizer = load_tokenizer(args.tokenizer_path)
    check_tokenizer_fits(tokenizer, config, args.tokenizer_path, args.config_path)
    return config, tokenizer, load_trained_model(args.model_path, config)


def what_to_check_on(args, config, tokenizer, show_report):
    """(what training held out (checks.held_out_tokens) or None, the windows whose logits are
    compared, a chat model's held-out conversations to format and answer, the greedy-text check's
    prompt or None)."""
    held_out = held_out_tokens(args.eval_text, config, tokenizer)
    if held_out and len(held_out.tokens) > 1:
        windows = check_windows(held_out.tokens, config)
    elif show_report:
        raise UserError("the report needs held-out text, and the training text recorded in the config "
                        f"({spec_text(config.get('dataset_path') or '')}) is not there: pass --eval_text FILE", 2)
    else:
        say("note: training text not found; checking logits on the built-in test strings instead")
        windows = [w for w in (encode(tokenizer, s)[:config["block_size"]] for s in HARD_STRINGS) if w]
        if check_length(config) > config["block_size"]:   # and the long pass, of those strings repeated
            windows += check_windows([t for w in windows for t in w], config)
    prompts = chat_prompts(held_out and held_out.conversations, tokenizer, config)
    if template_of_config(config, tokenizer) and not prompts:
        say("note: no held-out conversation to check the chat on (the training conversations are not where "
            "the config says, --eval_text was given instead, or none fits the block with room for an answer): "
            "the chat check is skipped")
    return held_out, windows, prompts, greedy_prompt(held_out.tokens if held_out else [], config,
                                                     tokenizer.token_to_id(END_OF_TEXT))


def export_and_check(args, model, tokenizer, quantized: dict, windows, prompts, greedy=None) -> None:
    """Write every export, then quantize from full-precision weights, not from the F16 file, so
    nothing is rounded twice; check each against the model (greedy: the greedy-text check's
    prompt, for the unquantized exports that generate). Everything is written under temporary
    names and moves into place only when every file passed its check: a failure leaves the
    previous files as they were."""
    source = f"{args.gguf_output}.source-f32"
    for path in [getattr(args, f.flag) for f in FORMATS] + list(quantized.values()) + [source]:
        remove_stale_temporaries(path)   # left by a run that was killed
    started = time.time()
    with staging() as stage:
        written = []   # (format, where it goes, where it is until every check passed, tolerance)
        for export_format in FORMATS:
            path = getattr(args, export_format.flag)
            with stage.path(path, folder=export_format.folder) as tmp:
                export_format.write(model, tokenizer, tmp)
            written.append((export_format, path, tmp, export_format.tolerance))
            say(f"Wrote {shown(path, export_format.folder)} ({export_format.description})")
        with stage.path(source, scratch=True) as f32:
            write_gguf(model, tokenizer, f32, "F32")
        for quant_type, path in quantized.items():
            with stage.path(path) as tmp:
                quantize(f32, tmp, quant_type, args.llama_cpp_path)
            report_written(path, tmp, quant_type, model.config)
            written.append((GGUF, path, tmp, None))   # quantized: no tolerance, a report
        os.remove(f32)
        say(f"Export took {time.time() - started:.1f}s")

        failures = []
        for export_format, path, tmp, tolerance in written:
            failures += check_and_say(export_format, path, tmp, tolerance, model, tokenizer, windows)
            if prompts and not failures:
                failures += check_chat_and_say(export_format, path, tmp, tolerance, model, tokenizer, prompts)
            if greedy and tolerance is not None and export_format.greedy_read_back and not failures:
                failures += check_greedy_and_say(export_format, path, tmp, model, tokenizer, greedy)
        if failures:
            raise UserError("; ".join(failures) + "; nothing was replaced: the previous files are untouched")


def shown(path: str, folder: bool) -> str:
    return path.rstrip("/") + "/" if folder else path


def check_and_say(export_format, path, written, tolerance, model, tokenizer, windows) -> list:
    """One line on how the export bound for path (written, for now) compares with the model;
    what failed, if anything."""
    try:
        r = check_export(export_format, written, model, tokenizer, windows)
    except LlamaCrash as crash:
        say(f"Check {shown(path, export_format.folder)}: {crash}")
        return [f"{crash} while checking {path}"]
    n_hard = len(HARD_STRINGS)
    say(f"Check {shown(path, export_format.folder)}: {human_bytes(r['size'])}"
          + (f", {r['bpw']:.2f} bits/weight" if r["bpw"] is not None else "")
          + f", tokenization {r['tokens_agree']}/{n_hard} strings equal, "
          f"next token {100 * r['next_agree']:.1f}% equal, max relative logit error {r['rel_error']:.1e}"
          + past_the_block(windows, model.config["block_size"]))
    failures = []
    if r["tokens_agree"] != n_hard:
        failures.append(f"{path} tokenizes {n_hard - r['tokens_agree']} test string(s) differently")
    if tolerance is not None and r["rel_error"] > tolerance:
        failures.append(f"{path} logits differ from PyTorch by {r['rel_error']:.1e} "
                        f"(tolerance {tolerance:.0e} for {export_format.description})")
    return failures


def past_the_block(windows, block: int) -> str:
    """How far past the block the logits were compared, where they were (a windowed model's)."""
    longest = max((len(w) for w in windows), default=0)
    return f" (in passes of up to {longest} tokens, {longest / block:g} blocks)" if longest > block else ""


def check_chat_and_say(export_format, path, written, tolerance, model, tokenizer, prompts) -> list:
    """One line on how the export bound for path formats and answers held-out conversations: the
    formatting must be PyTorch's id for id, and an unquantized export's greedy answers too."""
    try:
        r = check_chat(export_format, written, model, tokenizer, prompts)
    except LlamaCrash as crash:
        say(f"Chat check {shown(path, export_format.folder)}: {crash}")
        return [f"{crash} while checking {path}'s chat"]
    n, answers = r["count"], r["answers"]
    ties = answers.count("near tie")
    say(f"Chat check {shown(path, export_format.folder)}: {r['prompts_agree']}/{n} held-out conversations "
        f"formatted id for id as in PyTorch, greedy answers {answers.count('equal')}/{n} equal"
        + (f" ({ties} parting at a near tie)" if ties else "") + f", {r['ended']}/{n} ending at the end of turn")
    failures = []
    if r["prompts_agree"] != n:
        failures.append(f"{path} formats {n - r['prompts_agree']} conversation(s) differently from PyTorch")
    if tolerance is not None and "differ" in answers:
        failures.append(f"{path} answers {answers.count('differ')} conversation(s) differently from PyTorch")
    return failures


def check_greedy_and_say(export_format, path, written, model, tokenizer, prompt) -> list:
    """One line on whether the unquantized export bound for path writes PyTorch's greedy text far
    past the block (a windowed model's check); what failed, if anything."""
    try:
        r = check_greedy(export_format, written, model, tokenizer, prompt)
    except LlamaCrash as crash:
        say(f"Greedy check {shown(path, export_format.folder)}: {crash}")
        return [f"{crash} while checking {path}'s greedy text"]
    block = model.config["block_size"]
    say(f"Greedy check {shown(path, export_format.folder)}: {r['n']} tokens after a prompt of {len(prompt)} "
        f"(block {block}): " + {"equal": "the same text as PyTorch",
                                "near tie": "the same text as PyTorch up to a near tie",
                                "differ": "NOT the text PyTorch writes"}[r["result"]])
    if r["result"] == "differ":
        return [f"{path} writes another greedy text than PyTorch past the block"]
    return []


def report_written(path, written, quant_type, config):
    """Which tensor types the quantized file bound for path (written, for now) holds, and which
    weight matrices could not get quant_type because of their row length."""
    types, _ = tensor_types(written)
    counts = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    say(f"Wrote {path} ({quant_type}; tensor types: "
          + ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1])) + ")")
    fallbacks = fallback_tensors(written, quant_type)
    if fallbacks:
        say(f"note: {len(fallbacks)} weight matrices have rows that do not divide into {quant_type}'s blocks of "
              f"{block_size(quant_type)} values, so llama.cpp gave them "
              f"{', '.join(sorted(set(fallbacks.values())))} instead (n_embd {config['n_embd']}; "
              "a multiple of 256 avoids this)")


def print_report(model, eval_tokens, eval_source, args, files):
    """Perplexity of the PyTorch model and of each file on the same windows, and how often
    each file's likeliest next token is PyTorch's."""
    windows = evaluation_windows(eval_tokens, model.block_size, args.eval_tokens)
    n_predicted = sum(len(targets) for _, targets in windows)
    say(f"\nWhat quantization costs, on {n_predicted:,} tokens of {eval_source} "
          f"({len(windows)} windows of {model.block_size} tokens, not overlapping):")
    started = time.time()
    reference = score(pytorch_logits(model), windows)
    rows = [{"name": "PyTorch (F32)", "size": None, "bpw": None, "perplexity": reference.perplexity,
             "ratio": None, "agreement": None}]
    for kind, path in files.items():
        try:
            scores = isolated.scores(path, windows)
        except LlamaCrash as crash:
            raise UserError(f"{crash} while measuring {path} for the report; the exports are written and "
                            "passed their checks") from None
        _, bpw = tensor_types(path)
        rows.append({"name": kind, "size": os.path.getsize(path), "bpw": bpw,
                     "perplexity": scores.perplexity, "ratio": scores.perplexity / reference.perplexity,
                     "agreement": scores.agreement(reference)})
    print(report_table(rows))
    say(f"(evaluated in {time.time() - started:.1f}s)")


if __name__ == "__main__":
    run(main)
