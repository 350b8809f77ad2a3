/// The host thread the caller runs on.
public enum HostThread {
    /// Gives the host CPU to another runnable thread, if there is one.
    ///
    /// The corresponding C function is `sched_yield`.
    public static func yield() { system_sched_yield() }
}
