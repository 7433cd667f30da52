"""Pure-Python install of infinipot_ros (engine, KV compression, CLI tools).

`pip install .` gives everything that does not need ROS: the KV cache and its
compression policies, the streaming engine and the `infinipot-*` command-line
tools. The ROS node and its generated interfaces (msg/srv) are built with
colcon from CMakeLists.txt in the same folder.
"""
from setuptools import find_packages, setup

setup(
    name="infinipot_ros",
    version="0.1.0",
    description="Capped-KV streaming video assistant (InfiniPot-V) for ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["infinipot_ros", "infinipot_ros.*"]),
    # Data files read at run time (the tiny tokenizer's corpus recipe); colcon installs the
    # whole package directory (CMakeLists.txt), so they are there too.
    package_data={"infinipot_ros.models": ["data/*.json"]},
    install_requires=[
        "numpy>=1.23",
        "torch>=2.4",
        "torchvision>=0.19",
        "transformers>=5.17,<6",
        "tokenizers>=0.21",
        "safetensors",
        "opencv-python-headless>=4.8",
        "psutil>=5.9",
        "pyyaml>=6",
        "tqdm>=4.60",
        "rosbags>=0.10",
        "filelock>=3.12",
    ],
    extras_require={
        "bench": ["matplotlib>=3.7"],
        "test": ["pytest>=7,<9"],
    },
    entry_points={
        "console_scripts": [
            "infinipot-stream=infinipot_ros.tools.stream:main",
            "infinipot-bench=infinipot_ros.tools.bench:main",
            "infinipot-load=infinipot_ros.tools.load:main",
            "infinipot-build-model=infinipot_ros.tools.build_tiny_model:main",
            "infinipot-video-to-bag=infinipot_ros.tools.bag_writer:main",
            "infinipot-replay=infinipot_ros.tools.replay:main",
            "infinipot-ask=infinipot_ros.tools.ask_client:ask_main",
            "infinipot-status=infinipot_ros.tools.ask_client:status_main",
            "infinipot-assistant=infinipot_ros.ros.node:main",
            "infinipot-bt-demo=infinipot_ros.tools.bt_demo:main",
            "infinipot-eval=infinipot_ros.tools.eval:main",
            "infinipot-policies=infinipot_ros.tools.policies:main",
        ],
    },
)
