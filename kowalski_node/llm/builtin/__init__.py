"""Built-in NumPy Llama engine over GGUF, able to run any layer range (for pipelining).

- `BuiltinBackend`: the async `LlmBackend` (name "builtin").
- `Engine`, `GenerationParams`, `GenerationRun`, `GenerationResult`: single-device generation.
- `LlamaModel` (`embed`, `run_layers`, `head`, `forward`, `new_cache`) and `LayerRangeCache`:
  the stages the mesh pipeline calls on each peer.
- `WeightStore`, `warm_weight_cache`: float32 weights with the on-disk cache.
"""

from kowalski_node.llm.builtin.backend import BuiltinBackend
from kowalski_node.llm.builtin.config import LlamaConfig
from kowalski_node.llm.builtin.engine import (
    Engine,
    GenerationParams,
    GenerationResult,
    GenerationRun,
)
from kowalski_node.llm.builtin.gguf_file import ModelFileError
from kowalski_node.llm.builtin.model import LayerRangeCache, LlamaModel
from kowalski_node.llm.builtin.sampling import Sampler, SamplingParams
from kowalski_node.llm.builtin.tokenizer import ChatTemplate, GgufTokenizer
from kowalski_node.llm.builtin.weights import WeightStore, warm_weight_cache

__all__ = [
    "BuiltinBackend",
    "ChatTemplate",
    "Engine",
    "GenerationParams",
    "GenerationResult",
    "GenerationRun",
    "GgufTokenizer",
    "LayerRangeCache",
    "LlamaConfig",
    "LlamaModel",
    "ModelFileError",
    "Sampler",
    "SamplingParams",
    "WeightStore",
    "warm_weight_cache",
]
