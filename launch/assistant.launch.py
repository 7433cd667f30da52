"""Start the infinipot_assistant node.

    ros2 launch infinipot_ros assistant.launch.py \
        [model:=Qwen/Qwen2.5-VL-3B-Instruct] [config:=/path/params.yaml] \
        [image_topic:=/camera/image_raw] [namespace:=robot1] [use_sim_time:=true] [log_level:=info]

Empty model / image_topic keep what the config file says.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def _node(context, *args, **kwargs):
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    overrides = {"use_sim_time": arg("use_sim_time").lower() in ("1", "true", "yes")}
    if arg("model"):
        overrides["model.id"] = arg("model")
    if arg("image_topic"):
        overrides["stream.image_topics"] = [t.strip() for t in arg("image_topic").split(",") if t.strip()]
    return [
        Node(
            package="infinipot_ros",
            executable="assistant_node",
            name="infinipot_assistant",
            namespace=arg("namespace"),
            output="screen",
            emulate_tty=True,
            parameters=[arg("config"), overrides],
            arguments=["--ros-args", "--log-level", arg("log_level")],
        )
    ]


def generate_launch_description():
    default_config = [FindPackageShare("infinipot_ros"), "/config/assistant.yaml"]
    return LaunchDescription([
        DeclareLaunchArgument("model", default_value="", description="model id or path; empty = config file"),
        DeclareLaunchArgument("config", default_value=default_config, description="parameters YAML"),
        DeclareLaunchArgument("image_topic", default_value="",
                              description="camera topic(s), comma-separated; empty = config file"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error"),
        OpaqueFunction(function=_node),
    ])
