from openelm_mlx import load, generate

def test_fixture_loads(tiny_checkpoint):
    model, tok = load(tiny_checkpoint)
    out = generate(model, tok, "Once upon a time", max_tokens=8)
    assert isinstance(out, str)
