// CLibDRM: libdrm (Debian's libdrm-dev) for Swift.
//
// pkg-config libdrm gives -I/usr/include/libdrm, where Debian installs
// drm.h and nouveau_drm.h; xf86drm.h is in /usr/include.
//
// Swift cannot import function-like macros (DRM_IOWR, _IOC_NR, ...), so this
// header turns the ones SVMDRM needs into static inline functions.
#ifndef SVMEMU_CLIBDRM_SHIM_H
#define SVMEMU_CLIBDRM_SHIM_H

#include <stdint.h>
#include <xf86drm.h>
#include <nouveau_drm.h>

// libdrm 2.4.114 (Debian 12) ships nouveau_drm.h with the SVM structs and
// DRM_NOUVEAU_SVM_INIT/BIND but without the ioctl request numbers; the kernel's
// include/uapi/drm/nouveau_drm.h defines them as below. Define them only if
// this libdrm does not.
#ifndef DRM_IOCTL_NOUVEAU_SVM_INIT
#define DRM_IOCTL_NOUVEAU_SVM_INIT \
    DRM_IOWR(DRM_COMMAND_BASE + DRM_NOUVEAU_SVM_INIT, struct drm_nouveau_svm_init)
#endif
#ifndef DRM_IOCTL_NOUVEAU_SVM_BIND
#define DRM_IOCTL_NOUVEAU_SVM_BIND \
    DRM_IOWR(DRM_COMMAND_BASE + DRM_NOUVEAU_SVM_BIND, struct drm_nouveau_svm_bind)
#endif

/// DRM_IOCTL_NOUVEAU_SVM_INIT: DRM_IOWR(DRM_COMMAND_BASE + 0x08, struct drm_nouveau_svm_init).
static inline unsigned long svmdrm_ioctl_nouveau_svm_init(void) {
    return (unsigned long)DRM_IOCTL_NOUVEAU_SVM_INIT;
}
/// DRM_IOCTL_NOUVEAU_SVM_BIND: DRM_IOWR(DRM_COMMAND_BASE + 0x09, struct drm_nouveau_svm_bind).
static inline unsigned long svmdrm_ioctl_nouveau_svm_bind(void) {
    return (unsigned long)DRM_IOCTL_NOUVEAU_SVM_BIND;
}
/// DRM_IOCTL_VERSION: DRM_IOWR(0x00, struct drm_version), what drmGetVersion() issues.
static inline unsigned long svmdrm_ioctl_version(void) {
    return (unsigned long)DRM_IOCTL_VERSION;
}

// The <asm-generic/ioctl.h> field decoders, for checking request numbers.
static inline unsigned int svmdrm_ioc_dir(unsigned long request) { return _IOC_DIR(request); }
static inline unsigned int svmdrm_ioc_type(unsigned long request) { return _IOC_TYPE(request); }
static inline unsigned int svmdrm_ioc_nr(unsigned long request) { return _IOC_NR(request); }
static inline unsigned int svmdrm_ioc_size(unsigned long request) { return _IOC_SIZE(request); }

// The NOUVEAU_SVM_BIND_* header field layout. Several are plain integer
// macros Swift could import, but NOUVEAU_SVM_BIND_*_MASK are parenthesised
// expressions and NOUVEAU_SVM_BIND_VALID_MASK uses 1ULL <<, which Swift's
// importer does not always take; export all of them uniformly as values.
static inline uint64_t svmdrm_bind_command_shift(void) { return NOUVEAU_SVM_BIND_COMMAND_SHIFT; }
static inline uint64_t svmdrm_bind_command_bits(void) { return NOUVEAU_SVM_BIND_COMMAND_BITS; }
static inline uint64_t svmdrm_bind_command_mask(void) { return NOUVEAU_SVM_BIND_COMMAND_MASK; }
static inline uint64_t svmdrm_bind_priority_shift(void) { return NOUVEAU_SVM_BIND_PRIORITY_SHIFT; }
static inline uint64_t svmdrm_bind_priority_bits(void) { return NOUVEAU_SVM_BIND_PRIORITY_BITS; }
static inline uint64_t svmdrm_bind_priority_mask(void) { return NOUVEAU_SVM_BIND_PRIORITY_MASK; }
static inline uint64_t svmdrm_bind_target_shift(void) { return NOUVEAU_SVM_BIND_TARGET_SHIFT; }
static inline uint64_t svmdrm_bind_target_bits(void) { return NOUVEAU_SVM_BIND_TARGET_BITS; }
static inline uint64_t svmdrm_bind_target_mask(void) { return NOUVEAU_SVM_BIND_TARGET_MASK; }
static inline uint64_t svmdrm_bind_valid_bits(void) { return NOUVEAU_SVM_BIND_VALID_BITS; }
static inline uint64_t svmdrm_bind_valid_mask(void) { return NOUVEAU_SVM_BIND_VALID_MASK; }
static inline uint64_t svmdrm_bind_command_migrate(void) { return NOUVEAU_SVM_BIND_COMMAND__MIGRATE; }
static inline uint64_t svmdrm_bind_target_gpu_vram(void) { return NOUVEAU_SVM_BIND_TARGET__GPU_VRAM; }

// Sizes as the C compiler lays the structs out (the kernel ABI).
static inline size_t svmdrm_sizeof_svm_init(void) { return sizeof(struct drm_nouveau_svm_init); }
static inline size_t svmdrm_sizeof_svm_bind(void) { return sizeof(struct drm_nouveau_svm_bind); }
static inline size_t svmdrm_sizeof_drm_version(void) { return sizeof(struct drm_version); }

// drmDevice's bus info and device info are unions of pointers; these accessors
// keep the Swift side from depending on how the importer names union members.
static inline drmPciBusInfoPtr svmdrm_device_pci_bus(drmDevicePtr d) { return d->businfo.pci; }
static inline drmPciDeviceInfoPtr svmdrm_device_pci_info(drmDevicePtr d) { return d->deviceinfo.pci; }
static inline drmUsbBusInfoPtr svmdrm_device_usb_bus(drmDevicePtr d) { return d->businfo.usb; }
static inline drmUsbDeviceInfoPtr svmdrm_device_usb_info(drmDevicePtr d) { return d->deviceinfo.usb; }
/// The platform (device-tree) device's full name, or NULL.
static inline const char *svmdrm_device_platform_name(drmDevicePtr d) {
    return d->businfo.platform ? d->businfo.platform->fullname : 0;
}
/// The host1x (Tegra) device's full name, or NULL.
static inline const char *svmdrm_device_host1x_name(drmDevicePtr d) {
    return d->businfo.host1x ? d->businfo.host1x->fullname : 0;
}
static inline const char *svmdrm_device_node(drmDevicePtr d, int type) {
    if (type < 0 || type >= DRM_NODE_MAX) return 0;
    if (!(d->available_nodes & (1 << type))) return 0;
    return d->nodes[type];
}

#endif
