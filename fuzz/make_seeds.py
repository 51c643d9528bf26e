#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/README.md) into
fuzz/corpus/<target>/ from the repository's fixtures. Deterministic: the
same files every run (tensor bytes come from a fixed linear congruential
generator). Usage: python3 fuzz/make_seeds.py   (from anywhere)"""
import json, os, shutil, struct

FUZZ = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(FUZZ)
FIX = os.path.join(REPO, "tests", "fixtures")
CORPUS = os.path.join(FUZZ, "corpus")


def out(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


class Lcg:
    def __init__(self, seed):
        self.s = seed

    def bytes(self, n):
        b = bytearray()
        for _ in range(n):
            self.s = (self.s * 6364136223846793005 + 1442695040888963407) % 2**64
            b.append(self.s >> 56)
        return bytes(b)

    def f16s(self, n):
        # small finite halves: exponent 0x3000..0x3bff range (about 0.1 to 1)
        b = bytearray()
        for x in self.bytes(2 * n)[::2]:
            b += struct.pack("<H", 0x3000 + (x << 2) | (0x8000 if x & 1 else 0))
        return bytes(b)


def tiny_vocab():
    tok = json.load(open(os.path.join(FIX, "tiny", "tokenizer", "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    tokens = [""] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    return tokens


# --- gguf -----------------------------------------------------------------
T_U32, T_I32, T_F32, T_BOOL, T_STRING, T_ARRAY = 4, 5, 6, 7, 8, 9
G_F32, G_F16, G_Q4_0, G_Q8_0 = 0, 1, 2, 8
BLOCK = {G_F32: (1, 4), G_F16: (1, 2), G_Q4_0: (32, 18), G_Q8_0: (32, 34)}


def gstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(kv, tensors, align=32):
    o = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, ty, payload in kv:
        o += gstr(k) + struct.pack("<I", ty) + payload
    off, datas = 0, []
    for name, dims, ty, data in tensors:
        o += gstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        o += struct.pack("<IQ", ty, off)
        off += -(-len(data) // align) * align
        datas.append(data)
    o += b"\0" * (-len(o) % align)
    for d in datas:
        o += d + b"\0" * (-len(d) % align)
    return o


def kv_u32(k, v):
    return (k, T_U32, struct.pack("<I", v))


def kv_f32(k, v):
    return (k, T_F32, struct.pack("<f", v))


def kv_str(k, v):
    return (k, T_STRING, gstr(v))


def kv_arr(k, ty, items, pack):
    return (k, T_ARRAY, struct.pack("<IQ", ty, len(items)) + b"".join(pack(x) for x in items))


def gguf_model(mat_type, with_output, rng, emb=32, heads=2, kv_heads=1, ff=64):
    tokens = tiny_vocab()
    types = []
    for t in tokens:
        if t == "<unk>":
            types.append(2)
        elif t in ("<s>", "</s>"):
            types.append(3)
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(6)
        else:
            types.append(1)
    scores = [-float(i) if t == 1 else 0.0 for i, t in enumerate(types)]
    hd = emb // heads
    kv = [
        kv_str("general.architecture", "llama"),
        kv_str("general.name", "fuzz-seed"),
        kv_u32("llama.context_length", 64),
        kv_u32("llama.embedding_length", emb),
        kv_u32("llama.block_count", 1),
        kv_u32("llama.feed_forward_length", ff),
        kv_u32("llama.rope.dimension_count", hd),
        kv_u32("llama.attention.head_count", heads),
        kv_u32("llama.attention.head_count_kv", kv_heads),
        kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5),
        kv_f32("llama.rope.freq_base", 10000.0),
        kv_str("tokenizer.ggml.model", "llama"),
        kv_arr("tokenizer.ggml.tokens", T_STRING, tokens, gstr),
        kv_arr("tokenizer.ggml.scores", T_F32, scores, lambda x: struct.pack("<f", x)),
        kv_arr("tokenizer.ggml.token_type", T_I32, types, lambda x: struct.pack("<i", x)),
        kv_u32("tokenizer.ggml.bos_token_id", 1),
        kv_u32("tokenizer.ggml.eos_token_id", 2),
        kv_u32("tokenizer.ggml.unknown_token_id", 0),
        ("tokenizer.ggml.add_bos_token", T_BOOL, b"\1"),
    ]

    def t(name, dims, ty):
        n = 1
        for d in dims:
            n *= d
        bl, bb = BLOCK[ty]
        if ty in (G_Q8_0, G_Q4_0):  # each block: a finite f16 scale, then quants
            data = b"".join(rng.f16s(1) + rng.bytes(bb - 2) for _ in range(n // bl))
        if ty == G_F16:
            data = rng.f16s(n)
        if ty == G_F32:
            data = b"".join(struct.pack("<f", 0.5) for _ in range(n))
        return (name, dims, ty, data)

    v = len(tokens)
    ts = [t("token_embd.weight", [emb, v], mat_type)]
    for suffix, dims in [
        ("attn_norm", [emb]),
        ("attn_q", [emb, emb]),
        ("attn_k", [emb, kv_heads * hd]),
        ("attn_v", [emb, kv_heads * hd]),
        ("attn_output", [emb, emb]),
        ("ffn_norm", [emb]),
        ("ffn_gate", [emb, ff]),
        ("ffn_up", [emb, ff]),
        ("ffn_down", [ff, emb]),
    ]:
        ts.append(t(f"blk.0.{suffix}.weight", dims, G_F32 if len(dims) == 1 else mat_type))
    ts.append(t("output_norm.weight", [emb], G_F32))
    if with_output:
        ts.append(t("output.weight", [emb, v], mat_type))
    return gguf(kv, ts)


def gguf_seeds():
    rng = Lcg(1)
    out("gguf", "tiny-q8_0-tied.gguf", gguf_model(G_Q8_0, False, rng))
    out("gguf", "tiny-q4_0-output.gguf", gguf_model(G_Q4_0, True, rng))
    out("gguf", "tiny-f16-tied.gguf", gguf_model(G_F16, False, rng))
    out("gguf", "metadata-only.gguf", gguf([kv_str("general.architecture", "llama"),
                                             kv_u32("general.alignment", 64)], [], align=64))


# --- safetensors_config ---------------------------------------------------
def safetensors(tensors, rng):
    header, body = {"__metadata__": {"format": "pt"}}, b""
    for name, shape, dtype in tensors:
        n = 1
        for d in shape:
            n *= d
        if dtype == "F32":
            data = b"".join(struct.pack("<f", 0.25) for _ in range(n))
        else:  # F16 / BF16: reuse the half pattern (finite either way)
            data = rng.f16s(n)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + body


def hf_seed(name, hidden, heads, kv_heads, ff, dtype, tied, rng):
    cfg = json.load(open(os.path.join(FIX, "tiny", "tiny-mha", "config.json")))
    hd = hidden // heads
    cfg.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
               head_dim=hd, intermediate_size=ff, num_hidden_layers=1,
               tie_word_embeddings=tied, max_position_embeddings=64)
    v = cfg["vocab_size"]
    ts = [("model.embed_tokens.weight", [v, hidden], dtype)]
    p = "model.layers.0."
    ts += [
        (p + "input_layernorm.weight", [hidden], dtype),
        (p + "self_attn.q_proj.weight", [hidden, hidden], dtype),
        (p + "self_attn.k_proj.weight", [kv_heads * hd, hidden], dtype),
        (p + "self_attn.v_proj.weight", [kv_heads * hd, hidden], dtype),
        (p + "self_attn.o_proj.weight", [hidden, hidden], dtype),
        (p + "post_attention_layernorm.weight", [hidden], dtype),
        (p + "mlp.gate_proj.weight", [ff, hidden], dtype),
        (p + "mlp.up_proj.weight", [ff, hidden], dtype),
        (p + "mlp.down_proj.weight", [hidden, ff], dtype),
        ("model.norm.weight", [hidden], dtype),
    ]
    if not tied:
        ts.append(("lm_head.weight", [v, hidden], dtype))
    config = json.dumps(cfg, indent=2).encode()
    out("safetensors_config", name, config + b"\0" + safetensors(ts, rng))


def hf_seeds():
    rng = Lcg(2)
    hf_seed("h8-f16-tied", 8, 2, 1, 16, "F16", True, rng)
    hf_seed("h8-f32-tied", 8, 2, 2, 16, "F32", True, rng)
    hf_seed("h32-bf16-tied", 32, 2, 1, 64, "BF16", True, rng)


# --- tokenizer_template ---------------------------------------------------
def tokenizer_seeds():
    tok = open(os.path.join(FIX, "tiny", "tokenizer", "tokenizer.json"), "rb").read()
    for t in ["smollm2.jinja", "llama2-chat.jinja"]:
        tmpl = open(os.path.join(FIX, "chat", t), "rb").read()
        out("tokenizer_template", t, tok + b"\0" + tmpl + b"\0" + "Hello, world! 123 ünï ✓".encode())
    out("tokenizer_template", "inline-template", tok + b"\0" +
        b"{% for m in messages %}{{ bos_token }}[{{ m.role }}] {{ m.content | trim }}{{ eos_token }}\n"
        b"{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}" + b"\0" + b"Hi there")


# --- server_request -------------------------------------------------------
def server_seeds():
    chat = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}],
         "max_tokens": 16, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
         "repeat_penalty": 1.1, "seed": 7, "stop": ["\n", "###"], "stream": True,
         "stream_options": {"include_usage": True}, "n": 1, "logprobs": False},
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3,
         "stop": "s", "ignore_eos": True},
    ]
    comp = [
        {"prompt": "The capital of France is"},
        {"prompt": [1, 2, 3], "max_tokens": 4, "echo": False, "suffix": None, "stream": False},
        {"prompt": ["one"], "stop": None, "temperature": 0, "seed": 1},
    ]
    for i, b in enumerate(chat):
        out("server_request", f"chat-{i}", b"\1" + json.dumps(b).encode())
    for i, b in enumerate(comp):
        out("server_request", f"completion-{i}", b"\0" + json.dumps(b).encode())


gguf_seeds()
hf_seeds()
tokenizer_seeds()
server_seeds()
for t in sorted(os.listdir(CORPUS)):
    files = os.listdir(os.path.join(CORPUS, t))
    print(t, len(files), "seeds, largest", max(os.path.getsize(os.path.join(CORPUS, t, f)) for f in files), "bytes")
