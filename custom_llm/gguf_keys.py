"""The GGUF metadata keys this project writes (export.py, the architecture modules) and reads
(runtime.py): one table, so writer and reader cannot drift apart. Keys that `gguf.GGUFWriter`
writes through its own methods (context_length, block_count, ...) are the gguf package's. No
torch here: inference imports it."""

# llama.cpp's own keys, read by name.
ARCHITECTURE = "general.architecture"          # gpt2, olmo2 (architectures.py: each module's GGUF_ARCH)
TOKENIZER_MODEL = "tokenizer.ggml.model"       # gpt2: byte-level BPE (tokenizer.py)
CHAT_TEMPLATE = "tokenizer.chat_template"      # a chat model's Jinja template (chat_format.py)
END_OF_TURN = "tokenizer.ggml.eot_token_id"    # a chat model's end of turn: stops generation

# This project's own keys.
TRAINED_CONTEXT = "custom_llm.trained_context_length"   # the block size trained on (gpt2.py, windowed.py)
POSITION_RULE = "custom_llm.position_rule"              # how gpt2's position rows past the block were made

# The architectures whose GGUFs inference_gguf.py runs: every architecture module's GGUF_ARCH
# (tests/test_code_shape.py checks that the two lists agree).
READABLE_ARCHITECTURES = ("gpt2", "olmo2")
# Those of them whose every layer attends to a window of the trained block (windowed.py): inference
# reads on past the block without sliding (runtime.GGUFModel).
WINDOWED_ARCHITECTURES = ("olmo2",)
