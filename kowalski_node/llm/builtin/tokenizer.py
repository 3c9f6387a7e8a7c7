"""Tokenizer and chat template rebuilt from GGUF metadata (no model-hub download).

The GGUF carries a GPT-2 style byte-level BPE (`tokenizer.ggml.tokens` + `merges`); the
pre-tokenizer named by `tokenizer.ggml.pre` decides how text is cut before BPE:
- "smollm" (SmolLM2): every digit on its own, then the GPT-2 byte-level regex;
- "qwen2": Qwen2's own split regex (digits one by one, letters with one leading non-letter,
  newlines kept in runs), then byte-level mapping without GPT-2's regex;
- "gpt2"/"default": the GPT-2 byte-level regex alone.
Control tokens (type 3) become special tokens so `<|im_start|>` encodes as one id; user-defined
tokens (type 4, e.g. Qwen's `<tool_call>`) always match as one id, as llama.cpp does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kowalski_node.llm.builtin.gguf_file import ModelFileError, TokenizerData

CONTROL_TOKEN_TYPE = 3
USER_DEFINED_TOKEN_TYPE = 4
# Qwen2's split regex as its tokenizer.json gives it (llama.cpp uses the same, case-expanded).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Pre-tokenizer names (tokenizer.ggml.pre) we reproduce.
_PRE_TOKENIZERS = ("default", "gpt2", "qwen2", "smollm")


def _pre_tokenizer(name: str) -> Any:
    """The HF `tokenizers` pre-tokenizer equal to llama.cpp's for `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    if name == "qwen2":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>")


class GgufTokenizer:
    """Byte-level BPE over the GGUF vocabulary, via HF `tokenizers`."""

    def __init__(self, data: TokenizerData) -> None:
        from tokenizers import AddedToken, Tokenizer, decoders, models

        if data.model != "gpt2":
            raise ModelFileError(
                f"tokenizer model {data.model!r} is not supported (only byte-level BPE 'gpt2')"
            )
        if data.pre not in _PRE_TOKENIZERS:
            raise ModelFileError(
                f"pre-tokenizer {data.pre!r} is not supported (known: {', '.join(sorted(_PRE_TOKENIZERS))})"
            )
        vocab = {tok: i for i, tok in enumerate(data.tokens)}
        if len(vocab) != len(data.tokens):
            raise ModelFileError("tokenizer vocabulary has duplicate tokens")
        merges: list[tuple[str, str]] = []
        for m in data.merges:
            left, sep, right = m.partition(" ")
            if not sep:
                raise ModelFileError(f"malformed BPE merge {m!r}")
            merges.append((left, right))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = _pre_tokenizer(data.pre)
        tok.decoder = decoders.ByteLevel()
        self.special_tokens: dict[str, int] = {
            t: i
            for i, (t, ty) in enumerate(zip(data.tokens, data.token_types, strict=False))
            if ty == CONTROL_TOKEN_TYPE
        }
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in self.special_tokens]
        )
        user_defined = [
            t
            for t, ty in zip(data.tokens, data.token_types, strict=False)
            if ty == USER_DEFINED_TOKEN_TYPE
        ]
        if user_defined:
            tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
        self._tok = tok
        self.vocab_size = len(data.tokens)
        self.bos_id = data.bos_id
        self.eos_id = data.eos_id
        self.add_bos = data.add_bos
        ends = {self.special_tokens[m] for m in END_MARKERS if m in self.special_tokens}
        if data.eos_id is not None:
            ends.add(data.eos_id)
        self.end_ids: frozenset[int] = frozenset(ends)

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids for `text`; with allow_special, control-token strings map to their ids."""
        if allow_special:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        # Encode around control strings so user text cannot inject them.
        ids: list[int] = []
        for piece in self._split_specials(text):
            ids.extend(self._tok.encode(piece, add_special_tokens=False).ids if piece else [])
        return ids

    def _split_specials(self, text: str) -> Iterable[str]:
        if not self.special_tokens:
            yield text
            return
        pattern = "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True))
        pos = 0
        for m in re.finditer(pattern, text):
            yield text[pos : m.start()]
            # Break the control string into ordinary pieces: encode its characters plainly.
            yield from (m.group(0)[:1], m.group(0)[1:])
            pos = m.end()
        yield text[pos:]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special))

    def token_to_id(self, token: str) -> int | None:
        found = self._tok.token_to_id(token)
        return None if found is None else int(found)


@dataclass(frozen=True)
class ChatTemplate:
    """ChatML rendering (`<|im_start|>role\\ncontent<|im_end|>\\n`), as SmolLM2's template does.

    The GGUF's Jinja template is not executed (no Jinja dependency); we recognise ChatML and
    take its default system prompt, which the template inserts when none is given.
    """

    default_system: str | None = None

    @classmethod
    def from_metadata(cls, template: str | None, special_tokens: dict[str, int]) -> ChatTemplate:
        if template is None:
            if "<|im_start|>" in special_tokens:
                return cls(None)
            raise ModelFileError("model has no chat template and no ChatML tokens")
        if "<|im_start|>" not in template:
            raise ModelFileError(
                "model's chat template is not ChatML; the builtin engine only renders ChatML"
            )
        # The newline may be a real one (SmolLM2) or the Jinja escape `\n` (Qwen2.5).
        m = re.search(
            r"'<\|im_start\|>system(?:\n|\\n)([^']*?)<\|im_end\|>(?:\n|\\n)'", template, re.DOTALL
        )
        if m is None:
            return cls(None)
        return cls(m.group(1).replace("\\n", "\n").replace("\\'", "'"))

    def segments(
        self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True
    ) -> list[tuple[str, bool]]:
        """The prompt as (text, is_control) pieces, so content is never parsed for control tokens."""
        out: list[tuple[str, bool]] = []

        def turn(role: str, content: str) -> None:
            out.extend(
                [
                    ("<|im_start|>", True),
                    (f"{role}\n{content}", False),
                    ("<|im_end|>", True),
                    ("\n", False),
                ]
            )

        if self.default_system is not None and (not messages or messages[0][0] != "system"):
            turn("system", self.default_system)
        for role, content in messages:
            if role not in ("system", "user", "assistant"):
                raise ValueError(f"unknown chat role {role!r}")
            turn(role, content)
        if add_generation_prompt:
            out.extend([("<|im_start|>", True), ("assistant\n", False)])
        return out

    def render(
        self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = True
    ) -> str:
        """Messages are (role, content) pairs; roles are system/user/assistant."""
        return "".join(
            t for t, _ in self.segments(messages, add_generation_prompt=add_generation_prompt)
        )

    def encode(
        self,
        tokenizer: GgufTokenizer,
        messages: Sequence[tuple[str, str]],
        *,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """Token ids of the rendered prompt; message text cannot inject control tokens."""
        ids: list[int] = []
        for text, control in self.segments(messages, add_generation_prompt=add_generation_prompt):
            if control:
                tid = tokenizer.special_tokens.get(text)
                if tid is None:
                    raise ModelFileError(f"tokenizer lacks the control token {text}")
                ids.append(tid)
            elif text:
                ids.extend(tokenizer.encode(text, allow_special=False))
        return ids
