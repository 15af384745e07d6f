"""The simulators, public and on the ground floor: gym-aloha (bimanual ViperX, scripted transfer-cube and
insertion experts) and Meta-World (Sawyer, scripted experts), with offscreen MuJoCo rendering.

The data room records their rollouts as tier episodes (`motus.data.sources.simulators`); the evaluate room
drives the same scenes in closed loop (`motus.evaluate.closed_loop`). Rollout generators here yield plain
records (frames, actions, state, instructions, ...) that the data room turns into `Episode`s.
"""
