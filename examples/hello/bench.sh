#!/bin/sh
# A tiny benchmark: time a CPU-bound shell loop and print the result in Bencher Metric Format.
uptime_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
start=$(uptime_ms)
i=0
sum=0
while [ $i -lt 20000 ]; do
    sum=$((sum + i * i))
    i=$((i + 1))
done
end=$(uptime_ms)
echo "hello from inside the microVM: $(uname -sr), $(nproc) vCPU, running as $(id -un)"
echo "sum of squares below 20000 = $sum"
printf '{"shell_loop":{"latency":{"value":%d}}}\n' "$(( (end - start) * 1000000 ))"
