"""Whether vLLM can serve a text adapter as a LoRA, and what the model card says then."""

from __future__ import annotations

from lorajobs.worker.serving import card_lines, vllm_serving


def test_a_plain_lora_is_servable_and_names_its_rank_flag() -> None:
    small = vllm_serving({"r": 8, "bias": "none", "use_dora": False, "modules_to_save": None})
    assert small == {
        "servable": True,
        "reasons": [],
        "rank": 8,
        "max_lora_rank": 8,
        "needs_max_lora_rank_flag": False,
    }
    big = vllm_serving({"r": 48, "rank_pattern": {"q_proj": 64}})
    assert big["servable"] and big["max_lora_rank"] == 64 and big["needs_max_lora_rank_flag"]
    assert "--max-lora-rank 64" in "\n".join(card_lines({"vllm": big}, "a"))


def test_dora_modules_to_save_bias_and_huge_ranks_are_served_merged() -> None:
    v = vllm_serving({"r": 1024, "use_dora": True, "modules_to_save": ["lm_head"], "bias": "all"})
    assert not v["servable"] and len(v["reasons"]) == 4 and v["max_lora_rank"] is None
    card = "\n".join(card_lines({"vllm": v}, "a"))
    assert "lorajobs export <job or this folder> --merge" in card and "DoRA" in card
