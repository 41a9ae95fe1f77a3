"""Replays an evaluation client's calls on a plugin checkpoint, in a process where `internvl3_hf` cannot be imported.

Usage: `python replay.py SPEC.json` prints one JSON line of results. The spec names the client (`lmms_eval` or
`vlmevalkit`), the checkpoint folders, the dtypes to load in (one pass each) and the cases. Each call below mirrors
the client's source (see `client_code.py` for the commits), with the line numbers cited at each call.
"""

import json
import sys


class BlockPackage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "internvl3_hf":
            raise ImportError("internvl3_hf is deliberately unavailable")


sys.meta_path.insert(0, BlockPackage())

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import client_code  # noqa: E402


def package_importable() -> bool:
    try:
        import internvl3_hf  # noqa: F401
    except ImportError:
        return False
    return True


def describe(model, tokenizer) -> dict:
    return {
        "class": type(model).__name__,
        "module": type(model).__module__,
        "attn": model.config._attn_implementation,
        "dtype": str(model.dtype),
        "tokenizer": type(tokenizer).__name__,
    }


def lmms_eval(spec: dict) -> dict:
    # lmms_eval/models/simple/internvl3.py L279-288 (device_map "cuda:N" -> the spec's device).
    model = AutoModel.from_pretrained(
        spec["checkpoint"],
        torch_dtype=getattr(torch, spec["dtype"]),
        low_cpu_mem_usage=True,
        use_flash_attn=True,
        trust_remote_code=True,
        device_map=spec["device"],
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"], trust_remote_code=True, use_fast=False)
    answers = []
    for case in spec["cases"]:
        gen_kwargs = client_code.lmms_eval_gen_kwargs(case["gen_kwargs"])  # L384-396
        visuals = [Image.open(path) for path in case["images"]]
        if case["kind"] == "video":  # L449-471
            pixel_values, num_patches_list, question = client_code.lmms_eval_video_inputs(visuals, case["contexts"])
            pixel_values = pixel_values.to(model.device)
        elif visuals:  # L401-434
            pixel_values, num_patches_list, question = client_code.lmms_eval_image_inputs(visuals, case["contexts"])
            pixel_values = pixel_values.to(model.device)
        else:  # L435-437
            pixel_values, num_patches_list, question = None, None, case["contexts"]
        response, _ = model.chat(  # L439-447 (positional tokenizer, pixel_values, question, gen_kwargs)
            tokenizer, pixel_values, question, gen_kwargs,
            num_patches_list=num_patches_list, history=None, return_history=True,
        )  # fmt: skip
        answers.append(response)
    # The official model card's batched call (neither client batches): one image per question, left padding.
    batch = spec["batch"]
    pixels = [client_code.lmms_eval_load_image(Image.open(path), max_num=6) for path in batch["images"]]
    batched = model.batch_chat(
        tokenizer, torch.cat(pixels).to(model.device, torch.bfloat16), num_patches_list=[p.shape[0] for p in pixels],
        questions=batch["questions"], generation_config=client_code.lmms_eval_gen_kwargs(batch["gen_kwargs"]),
    )  # fmt: skip
    return {**describe(model, tokenizer), "answers": answers, "batch_answers": batched}


def vlmevalkit(spec: dict) -> dict:
    # vlmeval/vlm/internvl/internvl_chat.py L147 and L181-186.
    tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"], trust_remote_code=True, use_fast=False)
    model = AutoModel.from_pretrained(
        spec["checkpoint"],
        torch_dtype=getattr(torch, spec["dtype"]),
        trust_remote_code=True,
        low_cpu_mem_usage=True,
        device_map="auto",
    ).eval()
    # L193-200, as released before open-compass/VLMEvalKit@dfc9b3a (2026-02-18), which still passed load_in_8bit.
    reward_tokenizer = AutoTokenizer.from_pretrained(spec["critic"], trust_remote_code=True, use_fast=False)
    reward_model = AutoModel.from_pretrained(
        spec["critic"],
        torch_dtype=getattr(torch, spec["dtype"]),
        load_in_8bit=False,
        trust_remote_code=True,
        low_cpu_mem_usage=True,
        device_map="auto",
    ).eval()
    kwargs = client_code.vlmevalkit_kwargs(**spec["kwargs"])  # L212-214
    generated = []
    for case in spec["generate"]:  # `generate_v2`, L381-448
        pixel_values, num_patches_list, prompt = client_code.vlmevalkit_image_inputs(case["message"])
        pixel_values = pixel_values.to(model.device)
        torch.manual_seed(0)
        response_list = []
        for idx in range(case["best_of_n"]):
            kwargs_default = client_code.vlmevalkit_candidate_kwargs(kwargs, idx)
            if case.get("system_prompt") is not None:  # L428-429 (`cot_prompt_version='r1'` sets one)
                model.system_message = case["system_prompt"]
            response = model.chat(
                tokenizer, pixel_values=pixel_values, num_patches_list=num_patches_list, question=prompt,
                generation_config=kwargs_default, verbose=idx == 0,
            )  # fmt: skip
            response_list.append(response)
        result = {"candidates": response_list}
        if case["best_of_n"] > 1:  # L440-447
            result["ranked"] = reward_model.select_best_response(
                tokenizer=reward_tokenizer, question=prompt, response_list=response_list,
                pixel_values=pixel_values, num_patches_list=num_patches_list,
            )  # fmt: skip
            result["scored"] = reward_model.select_best_response(
                tokenizer=reward_tokenizer, question=prompt, response_list=response_list,
                pixel_values=pixel_values, num_patches_list=num_patches_list, return_scores=True,
            )  # fmt: skip
        generated.append(result)
    # `chat_inner` / `chat_inner_v2`, L562-572 and L507-560: multi-turn with history.
    turns, message = [], []
    for user_content in spec["conversation"]:
        message.append({"role": "user", "content": user_content})
        pixel_values, num_patches_list, question, history = client_code.vlmevalkit_chat_inputs(message)
        response, history = model.chat(
            tokenizer, pixel_values=pixel_values.to(model.device), num_patches_list=num_patches_list,
            question=question, generation_config=dict(client_code.VLMEVALKIT_CHAT_KWARGS), history=history,
            return_history=True,
        )  # fmt: skip
        turns.append({"response": response, "history": history})
        message.append({"role": "assistant", "content": [{"type": "text", "value": response}]})
    return {
        **describe(model, tokenizer),
        "critic": describe(reward_model, reward_tokenizer),
        "generated": generated,
        "turns": turns,
    }


if __name__ == "__main__":
    spec = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(1)
    client = {"lmms_eval": lmms_eval, "vlmevalkit": vlmevalkit}[spec["client"]]
    results = {dtype: client({**spec, "dtype": dtype}) for dtype in spec["dtypes"]}
    print(json.dumps({"package_importable": package_importable(), **results}))
