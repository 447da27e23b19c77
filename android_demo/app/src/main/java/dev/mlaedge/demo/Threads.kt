// How many threads a phone's CPU work should use: its big cores, not its little ones (a thread on a little core
// holds every step back to the little core's speed). Read from the kernel's cpufreq files; pure JVM, tested there.
package dev.mlaedge.demo

import java.io.File

/** Cores whose highest frequency is above the slowest cluster's; every core when all clusters are alike. */
fun bigCoreCount(cpuDir: File = File("/sys/devices/system/cpu")): Int {
    val freqs = (cpuDir.listFiles() ?: emptyArray())
        .filter { it.name.matches(Regex("cpu[0-9]+")) }
        .mapNotNull { File(it, "cpufreq/cpuinfo_max_freq").takeIf { f -> f.isFile }?.readText()?.trim()?.toLongOrNull() }
    if (freqs.isEmpty()) return maxOf(1, Runtime.getRuntime().availableProcessors() / 2)
    val slowest = freqs.min()
    val big = freqs.count { it > slowest }
    return if (big == 0) freqs.size else big
}
