"""Prompt building: placeholders, label masking, prompt mask, padding, chat-template and plain paths."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from vlsurv.model.processor import IGNORE_INDEX, IMAGE_TOKEN, ProcessorError, VLMProcessor

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CLINICAL = "64 year-old male former smoker lung cancer patient, stage 1."
QUESTION = "Is there any pleural involvement or effusion present?"
ANSWER = "Small left pleural effusion."


@pytest.fixture
def tokenizer(tiny_decoder_dir):
    return AutoTokenizer.from_pretrained(tiny_decoder_dir, local_files_only=True)


@pytest.fixture
def processor(tokenizer):
    return VLMProcessor(tokenizer, num_image_tokens=5)


def test_plain_path_expands_image_and_masks_labels(processor, tokenizer):
    assert not processor.uses_chat_template
    item = processor.encode(CLINICAL, QUESTION, ANSWER)
    ids, labels, prompt_mask = item["input_ids"], item["labels"], item["prompt_mask"]
    assert int((ids == processor.image_token_id).sum()) == 5
    image_at = ids.tolist().index(processor.image_token_id)
    assert torch.all(ids[image_at : image_at + 5] == processor.image_token_id)
    answer = processor.answer_ids(ANSWER)
    n_prompt = ids.shape[0] - len(answer)
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert torch.all(labels[:n_prompt] == IGNORE_INDEX)
    assert labels[n_prompt:].tolist() == answer == ids[n_prompt:].tolist()
    assert prompt_mask.tolist() == [1] * n_prompt + [0] * len(answer)
    text = tokenizer.decode(ids[:n_prompt], skip_special_tokens=True)
    assert CLINICAL in text and "Question: " + QUESTION in text
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == ANSWER


def test_generation_prompt_has_no_answer(processor):
    item = processor.encode(CLINICAL, QUESTION)
    assert torch.all(item["labels"] == IGNORE_INDEX)
    assert torch.all(item["prompt_mask"] == 1)
    assert item["input_ids"][-1] != processor.eos_token_id


def test_chat_template_path(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    processor = VLMProcessor(tokenizer, num_image_tokens=3)
    assert processor.uses_chat_template
    text = processor.prompt_text(CLINICAL, QUESTION)
    assert text == f"<s><|user|>\n{CLINICAL} {IMAGE_TOKEN} {QUESTION}\n<|assistant|>\n"
    item = processor.encode(CLINICAL, QUESTION, ANSWER)
    assert int((item["input_ids"] == processor.image_token_id).sum()) == 3
    assert int((item["labels"] != IGNORE_INDEX).sum()) == len(processor.answer_ids(ANSWER))


def test_prefix_up_to_the_image_is_shared_by_all_questions(processor):
    first = processor.prompt_ids(CLINICAL, QUESTION)
    second = processor.prompt_ids(CLINICAL, "Are major vessels involved or compressed?")
    end = first.index(processor.image_token_id) + processor.num_image_tokens
    assert first[:end] == second[:end] and first[end:] != second[end:]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_on_the_requested_side(processor, side):
    short = processor.encode("", QUESTION, "No.")
    long = processor.encode(CLINICAL, QUESTION, ANSWER)
    batch = processor.collate([short, long], padding_side=side)
    n = short["input_ids"].shape[0]
    pad = batch["input_ids"].shape[1] - n
    row = slice(0, n) if side == "right" else slice(pad, None)
    pads = slice(n, None) if side == "right" else slice(0, pad)
    assert torch.equal(batch["input_ids"][0, row], short["input_ids"])
    assert torch.all(batch["input_ids"][0, pads] == processor.pad_token_id)
    assert torch.all(batch["labels"][0, pads] == IGNORE_INDEX)
    assert torch.all(batch["attention_mask"][0, pads] == 0) and torch.all(batch["prompt_mask"][0, pads] == 0)
    assert torch.equal(batch["input_ids"][1], long["input_ids"])


def test_collate_stacks_extra_tensors(processor):
    items = [dict(processor.encode(CLINICAL, QUESTION), image_tokens=torch.zeros(5, 2)) for _ in range(3)]
    assert processor.collate(items)["image_tokens"].shape == (3, 5, 2)


def test_bad_inputs_are_named(processor, tokenizer):
    with pytest.raises(ProcessorError, match="question .* contains <image>"):
        processor.encode(CLINICAL, "Where is the <image>?")
    with pytest.raises(ProcessorError, match="padding_side: expected one of"):
        processor.collate([processor.encode(CLINICAL, QUESTION)], padding_side="middle")
    with pytest.raises(ProcessorError, match="num_image_tokens: expected >= 1"):
        VLMProcessor(tokenizer, num_image_tokens=0)
    with pytest.raises(ProcessorError, match="plain prompt template: expected exactly one <image>"):
        VLMProcessor(tokenizer, num_image_tokens=2, template="{clinical} {question}")


def test_tokenizer_without_image_token_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(
        ["a b c"], trainers.BpeTrainer(vocab_size=50, special_tokens=["</s>"], show_progress=False)
    )
    plain = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    with pytest.raises(ProcessorError, match="has no <image> token"):
        VLMProcessor(plain, num_image_tokens=2)
