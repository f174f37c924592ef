// liveavatar: portrait image + speech audio -> raw video of that person talking.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <gst/base/gstaggregator.h>
#include <gst/gst.h>

G_BEGIN_DECLS

#define GST_TYPE_LIVE_AVATAR (gst_live_avatar_get_type())
G_DECLARE_FINAL_TYPE(GstLiveAvatar, gst_live_avatar, GST, LIVE_AVATAR, GstAggregator)

#define GST_TYPE_LIVE_AVATAR_BACKEND (gst_live_avatar_backend_get_type())
GType gst_live_avatar_backend_get_type(void);

typedef struct _GstLiveAvatarPrivate GstLiveAvatarPrivate;

struct _GstLiveAvatar {
  GstAggregator parent;

  GstAggregatorPad* image_pad;
  GstAggregatorPad* audio_pad;

  GstLiveAvatarPrivate* priv;  // Settings (under GST_OBJECT_LOCK) and streaming State (C++)
};

GST_ELEMENT_REGISTER_DECLARE(liveavatar);

G_END_DECLS
