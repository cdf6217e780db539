#!/bin/sh
# A tiny benchmark: time a CPU-bound loop and print the result in Bencher Metric Format.
start=$(date +%s%N)
i=0
sum=0
while [ $i -lt 20000 ]; do
    sum=$((sum + i * i))
    i=$((i + 1))
done
end=$(date +%s%N)
echo "hello from inside the microVM: $(uname -sr), $(nproc) vCPU"
echo "sum of squares below 20000 = $sum"
printf '{"shell_loop":{"latency":{"value":%s}}}\n' "$((end - start))"
