"""Damaging a checkpoint on purpose, for the tests of what verifies it."""


def flip_a_byte(step_dir):
  """Inverts one byte in the middle of the largest file under `step_dir`."""
  biggest = max((p for p in step_dir.rglob('*') if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2] ^= 0xFF
  biggest.write_bytes(bytes(data))
