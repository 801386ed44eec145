"""The transformers backend end to end on a tiny local Llama (built in the test, saved with
save_pretrained)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qa_extraction.backends.transformers_lm import ModelLoadError, TransformersBackend
from qa_extraction.extract import main as extract_main
from qa_extraction.llm import AnswerFormatError, parse_answer

REPORTS = Path(__file__).parent / "fixtures" / "qa" / "reports.csv"
VALID = '{"status": "present", "answer": "Small left pleural effusion measuring 12 mm."}'
# A Mistral-like template: no system role, so the backend folds the system text into the first user turn.
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('system role not supported') }}{% elif m['role'] == 'user' %}[INST] {{ "
    "m['content'] }} "
    "[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    from vlsurv.model.tiny import build_tiny_decoder

    texts = [VALID, '{"status": "absent", "answer": "No pleural effusion."}', REPORTS.read_text()] * 3
    return build_tiny_decoder(
        tmp_path_factory.mktemp("chat_lm"),
        texts,
        num_layers=1,
        hidden_size=32,
        num_heads=2,
        vocab_size=300,
        chat_template=NO_SYSTEM_TEMPLATE,
    )


@pytest.fixture
def two_questions(tmp_path) -> Path:
    path = tmp_path / "q.yaml"
    path.write_text(
        "questions:\n  - id: pleura\n    text: Is there any pleural effusion?\n"
        "  - id: bone\n    text: Are there bone changes?\n"
    )
    return path


def run(model_dir, out, questions, *extra) -> list[dict]:
    extract_main(
        [
            "--reports",
            str(REPORTS),
            "--id-column",
            "report_id",
            "--text-column",
            "findings",
            "--questions",
            str(questions),
            "--backend",
            "transformers",
            "--model",
            str(model_dir),
            "--device",
            "cpu",
            "--batch-size",
            "3",
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
            *extra,
        ]
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_real_tiny_model_broken_json_is_repaired_once_then_written_as_error(
    tiny_decoder_dir, two_questions, tmp_path, monkeypatch
):
    calls = []
    original = TransformersBackend.generate
    monkeypatch.setattr(
        TransformersBackend,
        "generate",
        lambda self, conversations: calls.append(len(conversations)) or original(self, conversations),
    )
    rows = run(tiny_decoder_dir, tmp_path / "x.jsonl", two_questions)
    assert [(r["report_id"], r["question_id"]) for r in rows] == [
        (f"r{i}", q) for i in range(1, 5) for q in ("pleura", "bone")
    ]  # no row dropped
    assert {r["status"] for r in rows} == {"error"}  # an untrained model does not write the JSON asked for
    assert all(isinstance(r["raw"], str) and r["error"] for r in rows)
    assert {r["backend"] for r in rows} == {"transformers"} and rows[0]["model"] == tiny_decoder_dir.name
    assert calls == [3, 3, 3, 3, 2, 2]  # each batch of 3 (then 2) generated, then repaired once


def test_valid_json_path_through_the_model_generate_step(
    chat_model_dir, two_questions, tmp_path, monkeypatch
):
    """The model's generate is replaced by one that writes fixed JSON tokens; everything around it is real."""
    backend_seen = []

    def fake_generate(self, input_ids, attention_mask=None, **kwargs):
        backend_seen.append((kwargs["do_sample"], kwargs["max_new_tokens"]))
        reply = torch.tensor(tokenizer(VALID, add_special_tokens=False)["input_ids"])
        return torch.cat([input_ids, reply.expand(input_ids.shape[0], -1)], dim=1)

    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    monkeypatch.setattr(LlamaForCausalLM, "generate", fake_generate)
    rows = run(chat_model_dir, tmp_path / "x.jsonl", two_questions, "--max-new-tokens", "64")
    assert len(rows) == 8 and {r["status"] for r in rows} == {"present"}
    assert rows[0]["answer"] == "Small left pleural effusion measuring 12 mm."
    assert backend_seen[0] == (False, 64)


def test_chat_template_is_used_and_a_system_role_it_rejects_is_folded(chat_model_dir, tiny_decoder_dir):
    backend = TransformersBackend(chat_model_dir, device="cpu")
    text = backend.prompt_text(
        [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Q?"}]
    )
    assert text.startswith("<s>[INST] Be exact.\n\nQ? [/INST]")
    plain = TransformersBackend(tiny_decoder_dir, device="cpu").prompt_text(
        [{"role": "user", "content": "Q?"}]
    )
    assert plain == "User: Q?\n\nAssistant:"


def test_a_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"not a model folder \(no config.json\)"):
        TransformersBackend(tmp_path)


@pytest.mark.parametrize(
    "reply, parsed",
    [
        ('```json\n{"status": "Absent", "answer": "No effusion."}\n```', ("absent", "No effusion.")),
        (
            'Answer: {"status": "not mentioned", "answer": ""} done',
            ("not_mentioned", "Not mentioned in the report."),
        ),
    ],
)
def test_parse_answer_accepts_fenced_and_wrapped_json(reply, parsed):
    assert parse_answer(reply) == parsed


@pytest.mark.parametrize(
    "reply, message",
    [
        ("no json here", "no JSON object found"),
        ('{"status": "maybe", "answer": "x"}', "status must be one of"),
        ('{"status": "present", "answer": ""}', "answer must be a non-empty string"),
        ('{"status": "present"', "invalid JSON"),
    ],
)
def test_parse_answer_rejects(reply, message):
    with pytest.raises(AnswerFormatError, match=message):
        parse_answer(reply)
