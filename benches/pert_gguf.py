"""llama.cpp's F16 GGUF of a HuggingFace LLaMA checkpoint with the same tensor shapes as an existing
F16 GGUF (used to give llama.cpp the perturbed SmolLM2 copy of `nibble-tools perturb`, so both
runtimes quantize the same off-grid weights; issue 5).

    python pert_gguf.py SRC.F16.gguf model.safetensors config.json OUT.gguf

Every metadata key and tensor type is copied from SRC; each tensor's data comes from the checkpoint
(q/k rows permuted as llama.cpp's convert_hf_to_gguf.py does). With OUT = "-" nothing is written:
it prints the largest difference from SRC's tensors, which is 0.0 when the checkpoint is the one SRC
was made from (the check that the name mapping and permutation are right). Needs numpy and gguf-py
(the venv of ../shared/peers/build-llamacpp.sh has both).
"""
import json, struct, sys
import numpy as np
import gguf

def load_st(path):
    with open(path, 'rb') as f:
        n = struct.unpack('<Q', f.read(8))[0]
        hdr = json.loads(f.read(n))
        base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode='r')
    out = {}
    for k, v in hdr.items():
        if k == '__metadata__':
            continue
        a, b = v['data_offsets']
        dt = {'F32': np.float32, 'F16': np.float16}[v['dtype']]
        out[k] = np.frombuffer(mm[base + a: base + b], dtype=dt).reshape(v['shape'])
    return out

def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

def hf_for(name, st, cfg):
    parts = name.split('.')
    if name == 'token_embd.weight': return st['model.embed_tokens.weight']
    if name == 'output_norm.weight': return st['model.norm.weight']
    if name == 'output.weight': return st['lm_head.weight']
    assert parts[0] == 'blk', name
    l = parts[1]; kind = parts[2]
    m = {'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
         'attn_output': 'self_attn.o_proj', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
         'ffn_down': 'mlp.down_proj', 'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm'}[kind]
    w = st[f'model.layers.{l}.{m}.weight']
    if kind == 'attn_q': w = permute(w, cfg['num_attention_heads'])
    if kind == 'attn_k': w = permute(w, cfg['num_key_value_heads'])
    return w

src_gguf, st_path, cfg_path, out = sys.argv[1:5]
cfg = json.load(open(cfg_path))
st = load_st(st_path)
r = gguf.GGUFReader(src_gguf)
tensors = []
maxdiff = 0.0
for t in r.tensors:
    w = hf_for(t.name, st, cfg)
    dt = t.data.dtype
    new = np.ascontiguousarray(w.astype(dt)).reshape(t.data.shape)
    d = float(np.max(np.abs(new.astype(np.float32) - np.asarray(t.data, dtype=np.float32))))
    maxdiff = max(maxdiff, d)
    tensors.append((t, new, d))
print('max abs diff vs source gguf:', maxdiff)
if out == '-':
    for t, new, d in tensors:
        if d > 0: print(t.name, d)
    sys.exit(0)
arch = 'llama'
w = gguf.GGUFWriter(out, arch)
for field in r.fields.values():
    if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith('GGUF.'):
        continue
    vt = field.types[0]
    sub = field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
    w.add_key_value(field.name, field.contents(), vt, sub_type=sub)
for t, new, d in tensors:
    w.add_tensor_info(t.name, new.shape, new.dtype, new.nbytes, t.tensor_type)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
for t, new, d in tensors:
    w.write_tensor_data(new)
w.close()
print('wrote', out)
