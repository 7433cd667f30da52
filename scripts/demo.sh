#!/usr/bin/env bash
# End-to-end demo (run by `make demo` with the venv and install/setup.bash sourced):
#  1. write the video into a rosbag2 (mcap) of sensor_msgs/Image,
#  2. start the node with `ros2 launch` on the embedded model,
#  3. replay the bag through ROS (restamped to now, 2x speed), printing status lines,
#  4. ask with `ros2 service call /ask`, print the final CacheStatus.
# Without the ros2 command (no ros2cli wheels, no ROS install) the node is started
# directly and the project's own client asks instead; the launch file is never faked.
set -eo pipefail
VIDEO=${1:?usage: demo.sh VIDEO}
RATE=${DEMO_RATE:-2}
MAX_TOKENS=${DEMO_MAX_TOKENS:-2048}

export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$((40 + RANDOM % 50))}
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
export PYTHONUNBUFFERED=1
work=$(mktemp -d -t infinipot-demo-XXXX)
export ROS_LOG_DIR=$work/log
params=$work/params.yaml
# The package's parameters, with a 2048-token budget so the cap is reached within the 80 s video.
sed "s/max_vision_tokens: 4096.*/max_vision_tokens: ${MAX_TOKENS}/" config/assistant.yaml > "$params"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
node_pid=""
monitor_pid=""
cleanup() {
  [ -n "$monitor_pid" ] && kill "$monitor_pid" 2>/dev/null || true
  if [ -n "$node_pid" ] && kill -0 "$node_pid" 2>/dev/null; then
    kill -INT "$node_pid" 2>/dev/null || true   # ros2 launch forwards SIGINT to the node
    for _ in $(seq 100); do kill -0 "$node_pid" 2>/dev/null || break; sleep 0.1; done
    kill -TERM -- "-$node_pid" 2>/dev/null || true
    grep -E "process has finished|process has died" "$work/node.log" || true
  fi
  echo "(demo files and logs: $work)"
}
trap cleanup EXIT

say "1. video -> rosbag2 (mcap): $VIDEO"
infinipot-video-to-bag "$VIDEO" "$work/vtest_bag" --storage mcap --topic /camera/image_raw --no-progress

say "2. start the assistant node (ROS_DOMAIN_ID=$ROS_DOMAIN_ID, budget $MAX_TOKENS vision tokens)"
set -m  # own process group, so SIGINT reaches ros2 launch and the node
if command -v ros2 >/dev/null; then
  ros2 launch infinipot_ros assistant.launch.py config:="$params" image_topic:=/camera/image_raw \
    > "$work/node.log" 2>&1 &
  HAVE_ROS2=1
else
  echo "no 'ros2' command here: starting the node directly (infinipot-assistant --ros-args --params-file ...)"
  infinipot-assistant --ros-args --params-file "$params" -p "stream.image_topics:=[/camera/image_raw]" \
    > "$work/node.log" 2>&1 &
  HAVE_ROS2=0
fi
node_pid=$!
set +m
if ! infinipot-status --wait-ready 180; then
  echo "node did not become ready; its log:"; cat "$work/node.log"; exit 1
fi

say "3. replay the bag at ${RATE}x (stamps shifted to now); status every 5 s"
infinipot-status --follow --interval 5 &
monitor_pid=$!
infinipot-replay "$work/vtest_bag" --rate "$RATE" --restamp --wait-for-subscribers 1
sleep 3  # let the worker finish the last frame pair
kill "$monitor_pid" 2>/dev/null || true; wait "$monitor_pid" 2>/dev/null || true; monitor_pid=""

say "4. ask"
since=$(( $(date +%s) - 20 ))
if [ "$HAVE_ROS2" = 1 ]; then
  echo "\$ ros2 service call /ask infinipot_ros/srv/Ask \"{question: 'What is happening in the video?', max_new_tokens: 24}\""
  ros2 service call /ask infinipot_ros/srv/Ask "{question: 'What is happening in the video?', max_new_tokens: 24}"
  echo "\$ ros2 service call /ask infinipot_ros/srv/Ask \"{question: 'What did you see in the last 20 seconds?', since: {sec: $since}, max_new_tokens: 24}\""
  ros2 service call /ask infinipot_ros/srv/Ask "{question: 'What did you see in the last 20 seconds?', since: {sec: $since}, max_new_tokens: 24}"
  echo "\$ ros2 service call /ask infinipot_ros/srv/Ask \"{question: ''}\"   # a bad request gets an error code"
  ros2 service call /ask infinipot_ros/srv/Ask "{question: ''}"
else
  infinipot-ask "What is happening in the video?" --max-new-tokens 24
  infinipot-ask "What did you see in the last 20 seconds?" --last 20 --max-new-tokens 24
  infinipot-ask "" || true
fi

say "5. final status"
infinipot-status
if [ "$HAVE_ROS2" = 1 ]; then
  echo "\$ ros2 topic echo --once /infinipot/status infinipot_ros/msg/CacheStatus --qos-durability transient_local --qos-reliability reliable"
  timeout 15 ros2 topic echo --once /infinipot/status infinipot_ros/msg/CacheStatus \
    --qos-durability transient_local --qos-reliability reliable
fi
echo
echo "The embedded model has random weights: answers are not meant to make sense; the KV cap is the point."
echo "Real weights: ros2 launch infinipot_ros assistant.launch.py model:=Qwen/Qwen2.5-VL-3B-Instruct"
