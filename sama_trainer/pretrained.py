"""Pretrained models and tokenizers: loading by name or folder with errors that say what to pass instead, and tiny
in-process stand-ins (a word-level tokenizer, a 2-layer BERT) for machines without the weights."""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoTokenizer


def load_pretrained_tokenizer(name_or_path: str, builtin: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained`` whose "not found" error names the flag and the ways to fix it.

    ``builtin`` lists the model names the calling recipe builds in-process (mentioned in the error).
    """
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        if os.path.isdir(name_or_path):
            raise ValueError(
                f"--model_name_or_path {name_or_path!r}: the folder has no loadable tokenizer ({err}). Save the "
                "tokenizer next to the model (tokenizer.save_pretrained(folder)) or pass the original model id."
            ) from err
        if not isinstance(err, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        options = [
            "a local folder with the model's config.json and tokenizer files",
            *(f"{name!r} (built in-process)" for name in builtin),
            "a Hub model id" + (" once online (HF_HUB_OFFLINE is set)" if offline else ""),
        ]
        raise ValueError(
            f"--model_name_or_path {name_or_path!r}: no such local folder and not loadable from the Hub cache or "
            f"the Hub. Pass {', or '.join(options)}."
        ) from err


def build_word_tokenizer(texts: list[str], vocab_size: int = 5000) -> Any:
    """A lower-cased word-level BERT-style tokenizer (``[CLS] words [SEP]``) over the most frequent words of
    ``texts``: a tokenizer that needs no download, for tiny models built in-process."""
    from collections import Counter

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    words = [w for w, _ in counts.most_common(max(vocab_size - len(specials), 0)) if w not in specials]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def tiny_bert_classifier(
    vocab_size: int,
    num_labels: int,
    max_positions: int = 512,
    *,
    hidden_size: int = 64,
    num_heads: int = 2,
    dropout: float = 0.1,
) -> Any:
    """A randomly initialised 2-layer BERT classifier (feed-forward size 2 × ``hidden_size``): runs anywhere in
    seconds. ``dropout`` is the hidden and attention dropout probability."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def load_classifier(name_or_path: str, label_names: list[str], seed: int, vocab_size: int | None = None) -> Any:
    """A sequence classifier with a freshly initialised head (the same head for a seed, whatever ran before).

    ``name_or_path`` is a model folder or Hub id, or ``"tiny-bert"`` for :func:`tiny_bert_classifier` (then
    ``vocab_size`` is required).
    """
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    id2label = dict(enumerate(label_names))
    label2id = {v: k for k, v in id2label.items()}
    if name_or_path == TINY_BERT:
        if vocab_size is None:
            raise ValueError("the tiny BERT needs vocab_size (the tokenizer's length)")
        model = tiny_bert_classifier(vocab_size, len(label_names))
        model.config.id2label, model.config.label2id = id2label, label2id
        return model
    return AutoModelForSequenceClassification.from_pretrained(
        name_or_path, num_labels=len(label_names), id2label=id2label, label2id=label2id
    )


TINY_BERT = "tiny-bert"  # the name under which recipes build tiny_bert_classifier with a word-level tokenizer
