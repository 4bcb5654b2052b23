"""ppo.py's data: the training and held-out prompts, encoded, and PPO-ptx's SFT rows (docs/data.md)."""

import common
import common.data


def load_prompts(args, tokenizer, max_prompt: int):
    """Training and held-out prompts, (records, token ids) each; the example prompt is printed."""
    records, eval_records = common.data.load_splits(args.data, args.eval_data, args.data_split, args.eval_split,
                                                    "prompts", args.skip_invalid)
    if eval_records is None:
        records, eval_records = common.data.split_eval(records, args.eval_fraction, args.seed)
    ids, n_cut, records = common.data.encode_prompts(records, tokenizer, max_prompt, args.truncation, args.data,
                                                     args.skip_invalid)
    eval_ids, _, eval_records = common.data.encode_prompts(eval_records[: args.num_eval_prompts], tokenizer,
                                                           max_prompt, args.truncation, "eval data", args.skip_invalid)
    common.print0(f"{len(ids)} prompts ({n_cut} cut from the left); example:\n" + tokenizer.decode(ids[0]))
    return records, ids, eval_records, eval_ids


def load_ptx(args, tokenizer, max_seq_len: int) -> list:
    """PPO-ptx's SFT rows (ids, trained mask), cut from the left to max_seq_len."""
    records = common.data.load_data(args.ptx_data, "sft", None, args.skip_invalid)
    rows = common.data.encode_records(records, lambda r, where: common.fit_record(tokenizer, r, max_seq_len)[0],
                                      args.ptx_data, args.skip_invalid, tokenizer)  # (rendered text read as turns)
    common.print0("example ptx (trained tokens in [[ ]]):\n" + common.show_example(tokenizer, *rows[0]))
    return rows
