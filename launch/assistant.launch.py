"""Start the infinipot_assistant node.

    ros2 launch infinipot_ros assistant.launch.py \
        [model:=Qwen/Qwen2.5-VL-3B-Instruct] [config:=/path/params.yaml] \
        [image_topic:=/camera/image_raw] [namespace:=robot1] [use_sim_time:=true] [log_level:=info] \
        [lifecycle:=false] [autostart:=true]

lifecycle:=false (default): a plain node that loads its model and starts
ingesting by itself. lifecycle:=true: a managed lifecycle node; with
autostart:=true this launch file drives configure + activate, with
autostart:=false it waits for `ros2 lifecycle set` or a lifecycle manager.
Empty model / image_topic keep what the config file says.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction, RegisterEventHandler
from launch.events import matches_action
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition
from launch_ros.events.lifecycle import ChangeState
from lifecycle_msgs.msg import Transition


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _node(context, *args, **kwargs):
    def arg(name):
        return LaunchConfiguration(name).perform(context)

    lifecycle = _truthy(arg("lifecycle"))
    autostart = _truthy(arg("autostart"))
    # A lifecycle launch drives the transitions itself; the node's own autostart is for plain use.
    overrides = {"use_sim_time": _truthy(arg("use_sim_time")), "autostart": not lifecycle}
    if arg("model"):
        overrides["model.id"] = arg("model")
    if arg("image_topic"):
        overrides["stream.image_topics"] = [t.strip() for t in arg("image_topic").split(",") if t.strip()]
    common = dict(
        package="infinipot_ros",
        executable="assistant_node",
        name="infinipot_assistant",
        namespace=arg("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[arg("config"), overrides],
        arguments=["--ros-args", "--log-level", arg("log_level")],
    )
    if not lifecycle:
        return [Node(**common)]
    node = LifecycleNode(**common)
    actions = [node]
    if autostart:
        actions += [
            RegisterEventHandler(OnStateTransition(
                target_lifecycle_node=node, goal_state="inactive",
                entities=[EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                                      transition_id=Transition.TRANSITION_ACTIVATE))],
            )),
            EmitEvent(event=ChangeState(lifecycle_node_matcher=matches_action(node),
                                        transition_id=Transition.TRANSITION_CONFIGURE)),
        ]
    return actions


def generate_launch_description():
    from launch_ros.substitutions import FindPackageShare

    default_config = [FindPackageShare("infinipot_ros"), "/config/assistant.yaml"]
    return LaunchDescription([
        DeclareLaunchArgument("model", default_value="", description="model id or path; empty = config file"),
        DeclareLaunchArgument("config", default_value=default_config, description="parameters YAML"),
        DeclareLaunchArgument("image_topic", default_value="",
                              description="camera topic(s), comma-separated; empty = config file"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error"),
        DeclareLaunchArgument("lifecycle", default_value="false",
                              description="true: a managed lifecycle node; false: a plain node that starts by itself"),
        DeclareLaunchArgument("autostart", default_value="true",
                              description="with lifecycle:=true, drive configure + activate from this launch file"),
        OpaqueFunction(function=_node),
    ])
