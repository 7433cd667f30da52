"""infinipot_ros: a streaming video assistant whose KV cache never grows.

Layers (imports point inward only):
  kv/      KV cache with a hard cap and the compression policies (pure torch)
  models/  one adapter per multimodal LLM family (transformers touch points)
  engine/  streaming ingest, ask, worker thread, stats (no ROS)
  ros/     the rclpy node;  tools/  CLI, replay, bag writer, model builder
"""

__version__ = "0.1.0"
